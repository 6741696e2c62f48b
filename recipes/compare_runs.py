"""Print runs side by side and plot their learning curves together.

    python recipes/compare_runs.py outputs/demo/mnist-sal16 outputs/demo/mnist-bp \
        --plot outputs/demo/comparison.png

Takes the output folders of any recipe that writes `results.json`: classifiers are compared by
test accuracy, language models by validation perplexity (or loss). Put the BP run last to get
SAL's step time and memory as ratios of BP's. Memory ratios use the rise of memory during
training (`peak_memory_increase_mb`) when both runs recorded it: the process's peak also holds
what every run loads before training (the data set, the libraries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sal_hf.reporting import plot_learning_curves, run_label, usage_summary


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path} cannot be read as JSON: {error}") from error


def load_run(folder: Path) -> tuple[dict, list[dict]]:
    results_file = folder / "results.json"
    if not results_file.is_file():
        raise SystemExit(
            f"{results_file} does not exist: give the --output_dir of a finished recipe run."
        )
    results = _read_json(results_file)
    if not isinstance(results, dict):
        raise SystemExit(f"{results_file} holds no recipe results (a JSON object is expected).")
    results.setdefault("run_folder", folder.name)
    state_file = folder / "trainer_state.json"
    state = _read_json(state_file) if state_file.is_file() else {}
    history = state.get("log_history", []) if isinstance(state, dict) else []
    return results, history


# The quality figure of a run: the first of these its results.json holds.
METRICS = (
    ("test_accuracy", "test acc", lambda value: f"{100 * value:.2f}%"),
    ("eval_perplexity", "val perplexity", lambda value: f"{value:.2f}"),
    ("eval_loss", "val loss", lambda value: f"{value:.4f}"),
)


def _metric(results: dict) -> tuple[str, str, object] | None:
    return next((m for m in METRICS if results.get(m[0]) is not None), None)


def _quality_column(runs: list[dict]) -> tuple[str, list[str]]:
    """The column's title and each run's figure: one metric's name when the runs share it."""
    metrics = [_metric(results) for results in runs]
    shared = {m[0] for m in metrics if m is not None}
    if len(shared) <= 1:
        title = next((m[1] for m in metrics if m is not None), "quality")
        return title, ["n/a" if m is None else m[2](r[m[0]])
                       for m, r in zip(metrics, runs, strict=True)]
    return "quality", ["n/a" if m is None else f"{m[1]} {m[2](r[m[0]])}"
                       for m, r in zip(metrics, runs, strict=True)]


def _label(results: dict) -> str:
    if "method" not in results:
        return str(results.get("run_folder", "run"))
    return run_label(results)


def _number(results: dict, key: str, pattern: str) -> str:
    value = results.get(key)
    return "n/a" if not isinstance(value, (int, float)) else pattern.format(value)


def format_table(runs: list[dict]) -> str:
    title, quality = _quality_column(runs)
    header = ["run", title, "train time s", "step ms", "peak MB", "params", "area usage"]
    rows = [header, ["---"] * len(header)]
    for results, figure in zip(runs, quality, strict=True):
        params = results.get("total_parameters")
        rows.append([
            _label(results), figure,
            _number(results, "train_runtime_s", "{:.1f}"),
            _number(results, "step_time_ms", "{:.2f}"),
            _number(results, "peak_memory_mb", "{:.0f}"),
            "n/a" if not isinstance(params, int) else f"{params / 1e6:.2f}M",
            usage_summary(results),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def ratios_to_bp(runs: list[dict]) -> list[str]:
    """Each run's step time and memory over the last run's, when that one is BP."""
    if len(runs) < 2 or runs[-1].get("method") != "bp":
        return []
    reference, lines = runs[-1], []
    for results in runs[:-1]:
        parts = []
        if results.get("step_time_ms") and reference.get("step_time_ms"):
            parts.append(f"step time x{results['step_time_ms'] / reference['step_time_ms']:.2f}")
        if results.get("peak_memory_increase_mb") and reference.get("peak_memory_increase_mb"):
            ratio = results["peak_memory_increase_mb"] / reference["peak_memory_increase_mb"]
            parts.append(f"training memory (rise during training) x{ratio:.2f}")
        if results.get("peak_memory_mb") and reference.get("peak_memory_mb"):
            ratio = results["peak_memory_mb"] / reference["peak_memory_mb"]
            parts.append(f"process peak memory x{ratio:.2f}")
        if parts:
            lines.append(f"{_label(results)} vs {_label(reference)}: {', '.join(parts)}")
    return lines


def data_note(runs: list[dict]) -> str | None:
    data = [str(r.get("dataset") or r.get("corpus") or "?") for r in runs]
    if len(set(data)) > 1:
        return (f"Note: these runs trained on different data ({', '.join(data)}); their "
                "figures are not comparable.")
    return None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="output folders of recipe runs (each with results.json)")
    parser.add_argument("--plot", type=Path, help="where to write the combined learning curves")
    options = parser.parse_args(argv)
    loaded = [load_run(folder) for folder in options.runs]
    runs = [results for results, _ in loaded]
    print(format_table(runs))
    for line in ratios_to_bp(runs) + [note for note in [data_note(runs)] if note]:
        print(line)
    if options.plot:
        histories = {_label(results): history for results, history in loaded}
        title = runs[0].get("dataset") or runs[0].get("corpus") or ""
        first = _metric(runs[0])
        metric_key = "eval_accuracy" if first and first[0] == "test_accuracy" else "eval_loss"
        plot_learning_curves(histories, options.plot, metric_key=metric_key, title=title)
        print(f"learning curves: {options.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
