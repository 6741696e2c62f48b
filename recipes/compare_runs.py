"""Print runs of `train_classifier.py` side by side and plot their learning curves together.

    python recipes/compare_runs.py outputs/demo/mnist-sal16 outputs/demo/mnist-bp \
        --plot outputs/demo/comparison.png
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
        raise SystemExit(f"{results_file} does not exist: run recipes/train_classifier.py first.")
    results = json.loads(results_file.read_text())
    state_file = folder / "trainer_state.json"
    history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    return results, history


def format_table(runs: list[dict]) -> str:
    header = ["run", "test acc", "train time s", "step ms", "peak MB", "params", "area usage"]
    rows = [header, ["---"] * len(header)]
    for results in runs:
        rows.append([
            run_label(results),
            f"{100 * results['test_accuracy']:.2f}%",
            f"{results['train_runtime_s']:.1f}",
            f"{results['step_time_ms']:.2f}",
            f"{results['peak_memory_mb']:.0f}",
            f"{results['total_parameters'] / 1e6:.2f}M",
            usage_summary(results),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of train_classifier.py")
    parser.add_argument("--plot", type=Path, help="where to write the combined learning curves")
    options = parser.parse_args(argv)
    loaded = [load_run(folder) for folder in options.runs]
    runs = [results for results, _ in loaded]
    print(format_table(runs))
    if len(runs) >= 2 and runs[-1]["method"] == "bp":
        reference = runs[-1]
        for results in runs[:-1]:
            time_ratio = results["step_time_ms"] / reference["step_time_ms"]
            memory_ratio = results["peak_memory_mb"] / reference["peak_memory_mb"]
            print(f"{run_label(results)} vs {run_label(reference)}: step time x{time_ratio:.2f}, "
                  f"peak memory x{memory_ratio:.2f}")
    if options.plot:
        histories = {run_label(results): history for results, history in loaded}
        plot_learning_curves(histories, options.plot, title=runs[0]["dataset"])
        print(f"learning curves: {options.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
