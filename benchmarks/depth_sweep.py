"""Benchmark: the MLP classifier on MNIST at 2, 8, 32 and 128 hidden layers, SAL-16, BP and DFA.

    python benchmarks/depth_sweep.py                  # all 12 runs (see BUDGET for the epochs)
    python benchmarks/depth_sweep.py --depths 2 8     # some depths only (writes no results)
    python benchmarks/depth_sweep.py --quick          # a smoke run on a few hundred rows

Each run is `recipes/train_classifier.py` under `accelerate launch` with its tuned defaults
(hidden 256, ReLU, AdamW, cosine schedule) and `--num_layers`; deeper models train for fewer
epochs (`BUDGET`) to keep the sweep near 40 minutes of a 2-core machine. Losses are logged every
10 steps with the Trainer's NaN/inf filter off, so a non-finite loss at any step shows in the log:
each logged `task_loss` (SALTrainer's mean of every step's task loss since the last log) and
`loss` is a mean over steps, finite only if every one of those steps was. The run is also
checked for finite final weights. Writes `benchmarks/results/depth_sweep.json`, the table in
`docs/results.md` and `docs/depth_sweep.png` (accuracy and step time against depth).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_doc import replace_section  # benchmarks/ is on the path when run as a script
from safetensors.torch import load_file

from sal_hf.reporting import run_label, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "depth_sweep.json"
PLOT_FILE = ROOT / "docs" / "depth_sweep.png"
DEPTHS = (2, 8, 32, 128)
METHODS = ("sal", "bp", "dfa")
# Epochs per depth: what fits the sweep's budget (a SAL-16 step at 128 layers costs ~100x one
# at 2 layers). Other settings are the recipe's tuned defaults.
BUDGET = {2: 3, 8: 3, 32: 2, 128: 1}
TARGET = {"num_layers": 128, "method": "sal", "test_accuracy": 0.96}
LOGGED_KEYS = ("loss", "task_loss", "grad_norm", "eval_loss")


def planned_runs(depths: list[int], epochs: dict[int, float]) -> list[tuple[str, list[str]]]:
    runs = []
    for depth in depths:
        for method in METHODS:
            arguments = ["--dataset", "mnist", "--method", method, "--num_layers", str(depth),
                         "--num_train_epochs", str(epochs[depth])]
            runs.append((f"mnist-{method}-{depth}layers", arguments))
    return runs


def finiteness(output_dir: Path) -> dict:
    """How many logged losses/gradient norms were NaN or inf, and whether the weights are."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    values = [entry[key] for entry in history for key in LOGGED_KEYS if key in entry]
    weights = load_file(output_dir / "model.safetensors")
    return {
        "logged_values_checked": len(values),
        "nonfinite_logged_values": sum(not math.isfinite(v) for v in values),
        "weights_finite": all(bool(torch.isfinite(t).all()) for t in weights.values()),
        "train_task_losses": [e["task_loss"] for e in history if "task_loss" in e],
    }


def launch(name: str, arguments: list[str], output_root: Path, quick: bool) -> dict:
    output_dir = output_root / name
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", "accelerate_configs/cpu.yaml", "recipes/train_classifier.py",
        *arguments, "--output_dir", str(output_dir), "--disable_tqdm", "true",
        "--logging_steps", "10", "--logging_nan_inf_filter", "false",
    ]
    if quick:
        command += ["--limit", "512", "--max_steps", "8"]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    results = json.loads((output_dir / "results.json").read_text())
    results.update(finiteness(output_dir))
    results["run"] = name
    results["command"] = " ".join(["accelerate", *command[1:]]).replace(str(ROOT) + "/", "")
    results["wall_time_s"] = round(time.time() - started, 1)
    print(f"[{name}] test accuracy {results['test_accuracy']:.4f}, "
          f"{results['nonfinite_logged_values']} non-finite logged values", flush=True)
    return results


def markdown_table(runs: list[dict]) -> str:
    lines = [
        "| hidden layers | run | test accuracy | epochs | step ms | train time s | peak MB | "
        "params | non-finite logged losses / checked | weights finite |",
        "|" + "---|" * 10,
    ]
    for r in runs:
        lines.append(
            f"| {r['num_layers']} | {run_label(r)} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['epochs']:g} | {r['step_time_ms']:.1f} | {r['train_runtime_s']:.0f} | "
            f"{r['peak_memory_mb']:.0f} | {r['total_parameters'] / 1e6:.2f}M | "
            f"{r['nonfinite_logged_values']} / {r['logged_values_checked']} | "
            f"{'yes' if r['weights_finite'] else 'NO'} |"
        )
    target = next((r for r in runs if r["num_layers"] == TARGET["num_layers"]
                   and r["method"] == TARGET["method"]), None)
    if target is not None:
        met = (target["test_accuracy"] >= TARGET["test_accuracy"]
               and target["nonfinite_logged_values"] == 0 and target["weights_finite"])
        lines += [
            "",
            f"Target: the {TARGET['num_layers']}-layer SAL-16 MLP reaches at least "
            f"{100 * TARGET['test_accuracy']:.0f}% with no NaN or inf at any step: "
            f"**{'met' if met else 'missed'}** ({100 * target['test_accuracy']:.2f}%).",
        ]
    budget = ", ".join(f"{depth} layers: {epochs:g}" for depth, epochs in BUDGET.items())
    lines += ["", f"Epochs per depth (the sweep's budget): {budget}. Loss logged every 10 steps "
              "with the Trainer's NaN/inf filter off; each logged loss is a mean over the steps "
              "since the last log, so it is finite only if all of them were."]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        rows = sorted((r for r in runs if r["method"] == method), key=lambda r: r["num_layers"])
        if not rows:
            continue
        depths = [r["num_layers"] for r in rows]
        label = run_label(rows[0])
        accuracy_axis.plot(depths, [100 * r["test_accuracy"] for r in rows], marker="o",
                           label=label)
        time_axis.plot(depths, [r["step_time_ms"] for r in rows], marker="o", label=label)
    accuracy_axis.axhline(100 * TARGET["test_accuracy"], color="grey", linestyle=":",
                          label="target (SAL, 128 layers)")
    accuracy_axis.set(xscale="log", xlabel="hidden layers", ylabel="MNIST test accuracy %",
                      title="accuracy")
    time_axis.set(xscale="log", yscale="log", xlabel="hidden layers",
                  ylabel="ms per training step", title="step time (batch 128)")
    for axis in (accuracy_axis, time_axis):
        axis.set_xticks(list(DEPTHS), [str(d) for d in DEPTHS])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("MLP (hidden 256) on MNIST: depth sweep")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--quick", action="store_true", help="smoke run; writes no results")
    parser.add_argument("--output_root", type=Path, default=ROOT / "outputs" / "depth_sweep")
    options = parser.parse_args(argv)
    unknown = sorted(set(options.depths) - set(BUDGET))
    if unknown:
        parser.error(f"--depths {unknown} have no epoch budget; choose from {sorted(BUDGET)}.")
    started = time.time()
    runs = [launch(name, arguments, options.output_root, options.quick)
            for name, arguments in planned_runs(options.depths, BUDGET)]
    print(markdown_table(runs))
    if options.quick or sorted(options.depths) != list(DEPTHS):
        return
    command = "python benchmarks/depth_sweep.py " + " ".join(argv)
    document = {
        "benchmark": "depth_sweep", "command": command.strip(),
        "date": datetime.date.today().isoformat(), "epochs_per_depth": BUDGET,
        "sweep_wall_time_s": round(time.time() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "runs": runs,
    }
    write_results(RESULTS_FILE, document)
    plot(runs, PLOT_FILE)
    body = markdown_table(runs) + "\n\n![accuracy and step time against depth](depth_sweep.png)"
    replace_section("depth_sweep", body, document["command"])


if __name__ == "__main__":
    main(sys.argv[1:])
