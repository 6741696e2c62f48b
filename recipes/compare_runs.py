"""Print runs side by side and plot their learning curves together.

    python recipes/compare_runs.py outputs/demo/mnist-sal16 outputs/demo/mnist-bp \
        --plot outputs/demo/comparison.png

Takes the output folders of any recipe that writes `results.json`: classifiers are compared by
test accuracy, language models by validation perplexity (or loss). Put the BP run last to get
SAL's step time and memory as ratios of BP's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sal_hf.reporting import plot_learning_curves, run_label, usage_summary


def load_run(folder: Path) -> tuple[dict, list[dict]]:
    results_file = folder / "results.json"
    if not results_file.is_file():
        raise SystemExit(
            f"{results_file} does not exist: give the --output_dir of a finished recipe run."
        )
    results = json.loads(results_file.read_text())
    state_file = folder / "trainer_state.json"
    history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    return results, history


# The quality figure of a run: the first of these its results.json holds (None: not measured).
METRICS = (
    ("test_accuracy", "test acc", lambda value: f"{100 * value:.2f}%"),
    ("eval_perplexity", "val perplexity", lambda value: f"{value:.2f}"),
    ("eval_loss", "val loss", lambda value: f"{value:.4f}"),
)


def _metric(runs: list[dict]) -> tuple[str, str, object]:
    for key, title, show in METRICS:
        if any(results.get(key) is not None for results in runs):
            return key, title, show
    return "", "quality", str


def _number(results: dict, key: str, pattern: str) -> str:
    value = results.get(key)
    return "n/a" if value is None else pattern.format(value)


def format_table(runs: list[dict]) -> str:
    key, title, show = _metric(runs)
    header = ["run", title, "train time s", "step ms", "peak MB", "params", "area usage"]
    rows = [header, ["---"] * len(header)]
    for results in runs:
        value = results.get(key)
        rows.append([
            run_label(results),
            "n/a" if value is None else show(value),
            _number(results, "train_runtime_s", "{:.1f}"),
            _number(results, "step_time_ms", "{:.2f}"),
            _number(results, "peak_memory_mb", "{:.0f}"),
            "n/a" if results.get("total_parameters") is None
            else f"{results['total_parameters'] / 1e6:.2f}M",
            usage_summary(results),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="output folders of recipe runs (each with results.json)")
    parser.add_argument("--plot", type=Path, help="where to write the combined learning curves")
    options = parser.parse_args(argv)
    loaded = [load_run(folder) for folder in options.runs]
    runs = [results for results, _ in loaded]
    print(format_table(runs))
    if len(runs) >= 2 and runs[-1].get("method") == "bp":
        reference = runs[-1]
        for results in runs[:-1]:
            if not all(r.get(k) for r in (results, reference)
                       for k in ("step_time_ms", "peak_memory_mb")):
                continue
            time_ratio = results["step_time_ms"] / reference["step_time_ms"]
            memory_ratio = results["peak_memory_mb"] / reference["peak_memory_mb"]
            print(f"{run_label(results)} vs {run_label(reference)}: step time x{time_ratio:.2f}, "
                  f"peak memory x{memory_ratio:.2f}")
    if options.plot:
        histories = {run_label(results): history for results, history in loaded}
        title = runs[0].get("dataset") or runs[0].get("corpus") or ""
        metric_key = "eval_accuracy" if _metric(runs)[0] == "test_accuracy" else "eval_loss"
        plot_learning_curves(histories, options.plot, metric_key=metric_key, title=title)
        print(f"learning curves: {options.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
