"""Benchmark: the MLP classifier on MNIST at 2, 8, 32 and 128 hidden layers, SAL-16, BP and DFA.

    python benchmarks/depth_sweep.py                  # all 12 runs (see BUDGET for the epochs)
    python benchmarks/depth_sweep.py --depths 2 8     # some depths only (writes no results)
    python benchmarks/depth_sweep.py --quick          # a smoke run on a few hundred rows
    python benchmarks/depth_sweep.py --depths 128 --methods sal --hidden_act tanh --epochs 2
                                                      # a try, recorded beside the sweep

Each run is `recipes/train_classifier.py` under `accelerate launch`, with pre-norm residual
hidden layers of width 256 (`--residual true`), batch 512, the epochs of `BUDGET` and a
learning rate per method (`LEARNING_RATES`); the whole sweep takes about an hour on a 2-core
machine. Losses are logged every 10 steps with the Trainer's NaN/inf filter off, so a non-finite
loss at any step shows in the log: each logged `task_loss` (SALTrainer's mean of every step's
task loss since the last log) and `loss` is a mean over steps, finite only if every one of those
steps was. The run is also checked for finite final weights. Writes
`benchmarks/results/depth_sweep.json`, the table in `docs/results.md` and `docs/depth_sweep.png`
(accuracy and step time against depth).

A run with other settings than the sweep's (`--hidden_act`, `--learning_rate`, `--epochs`, or
some methods only) is a *try*: it is added to the results file's `tries` and shown in a second
table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_doc import git_commit, replace_section  # benchmarks/ is on the path as a script
from safetensors.torch import load_file

from sal_hf.reporting import run_label, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "depth_sweep.json"
PLOT_FILE = ROOT / "docs" / "depth_sweep.png"
DEPTHS = (2, 8, 32, 128)
METHODS = ("sal", "bp", "dfa")
# The sweep's settings, the same at every depth: pre-norm residual hidden layers (plain ReLU
# layers lose the signal with depth under feedback methods: 8 plain layers trained by DFA
# reached 69% after one epoch, their activations growing to ~1e6), batch 512. Fewer epochs at
# the deeper end keep the sweep near an hour on 2 cores (a SAL-16 epoch at 128 layers took
# about 6 minutes).
# Learning rates from one-epoch tries at 32 layers: DFA 1e-3 / 3e-3 / 1e-2 / 3e-2 gave
# 74% / 88% / 90% / 89%; BP is the recipe's tuned 1e-3 (95.6% after one epoch).
BUDGET = {2: 10, 8: 10, 32: 6, 128: 4}
BATCH_SIZE = 512
LEARNING_RATES = {"sal": 1e-2, "dfa": 1e-2, "bp": 1e-3}
TARGET = {"num_layers": 128, "method": "sal", "test_accuracy": 0.96}
LOGGED_KEYS = ("loss", "task_loss", "grad_norm", "eval_loss")


def planned_runs(depths: list[int], methods: list[str], epochs: dict[int, float],
                 learning_rate: float | None, hidden_act: str) -> list[tuple[str, list[str]]]:
    runs = []
    for depth in depths:
        for method in methods:
            rate = learning_rate if learning_rate is not None else LEARNING_RATES[method]
            arguments = ["--dataset", "mnist", "--method", method, "--num_layers", str(depth),
                         "--residual", "true", "--hidden_act", hidden_act,
                         "--per_device_train_batch_size", str(BATCH_SIZE),
                         "--num_train_epochs", str(epochs[depth]), "--learning_rate", str(rate)]
            suffix = "" if hidden_act == "relu" else f"-{hidden_act}"
            if learning_rate is not None or epochs[depth] != BUDGET[depth]:  # a try's own folder
                suffix += f"-lr{rate:g}-{epochs[depth]:g}ep"
            runs.append((f"mnist-{method}-{depth}layers{suffix}", arguments))
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
    runner = [str(Path(sys.executable).parent / "accelerate"), "launch",
              "--config_file", "accelerate_configs/cpu.yaml", "recipes/train_classifier.py"]
    command = [
        *runner, *arguments, "--output_dir", str(output_dir), "--disable_tqdm", "true",
        "--logging_steps", "10", "--logging_nan_inf_filter", "false",
    ]
    if quick:
        command += ["--limit", "512", "--max_steps", "8"]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    started = time.time()
    # One thread unless told otherwise: on a shared 2-core machine, two threads per process made
    # a 128x256x256 matmul 9x slower than one (the threads wait for each other's core).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    results = json.loads((output_dir / "results.json").read_text())
    results.update(finiteness(output_dir))
    results["run"] = name
    shown = ["accelerate", *command[1:]]
    results["command"] = " ".join(shown).replace(str(ROOT) + "/", "")
    results["wall_time_s"] = round(time.time() - started, 1)
    print(f"[{name}] test accuracy {results['test_accuracy']:.4f}, "
          f"{results['nonfinite_logged_values']} non-finite logged values", flush=True)
    return results


def _row(r: dict) -> str:
    return (
        f"| {r['num_layers']} | {run_label(r)} | {r.get('hidden_act', 'relu')} | "
        f"{r['learning_rate']:g} | {r['epochs']:g} | {100 * r['test_accuracy']:.2f}% | "
        f"{r['step_time_ms']:.1f} | {r['train_runtime_s']:.0f} | {r['peak_memory_mb']:.0f} | "
        f"{r['total_parameters'] / 1e6:.2f}M | {r['nonfinite_logged_values']} / "
        f"{r['logged_values_checked']} | {'yes' if r['weights_finite'] else 'NO'} | "
        f"{min(r['train_task_losses'], default=float('nan')):.3g} / "
        f"{(r['train_task_losses'] or [float('nan')])[-1]:.3g} |"
    )


def _target_line(runs: list[dict]) -> str:
    for r in runs:
        if r["num_layers"] == TARGET["num_layers"] and r["method"] == TARGET["method"]:
            met = (r["test_accuracy"] >= TARGET["test_accuracy"]
                   and r["nonfinite_logged_values"] == 0 and r["weights_finite"])
            return (f"{r.get('hidden_act', 'relu')}, lr {r['learning_rate']:g}, "
                    f"{r['epochs']:g} epochs: **{'met' if met else 'missed'}** "
                    f"({100 * r['test_accuracy']:.2f}%)")
    return ""


def markdown_table(runs: list[dict], tries: list[dict] | None = None) -> str:
    header = [
        "| hidden layers | run | activation | lr | epochs | test accuracy | step ms | "
        "train time s | peak MB | params | non-finite logged losses / checked | "
        "weights finite | task loss min / last logged |",
        "|" + "---|" * 13,
    ]
    lines = header + [_row(r) for r in runs]
    budget = ", ".join(f"{depth} layers: {epochs:g}" for depth, epochs in BUDGET.items())
    lines += ["", f"Pre-norm residual hidden layers (`--residual true`), hidden 256, ReLU, "
              f"AdamW, batch {BATCH_SIZE}, cosine schedule; SAL-16 with its shared path; "
              f"epochs per depth: {budget}. Loss logged every 10 steps with "
              "the Trainer's NaN/inf filter off; each logged loss is a mean over the steps "
              "since the last log, so it is finite only if all of them were. One thread per "
              "run; the runs shared the 2 cores with other jobs, so step times and train "
              "times are indicative only. Tries ran at other times; their commands (and, "
              "when recorded, commits) are in the results file."]
    every = [*runs, *(tries or [])]
    verdicts = [_target_line([r]) for r in every]
    verdicts = [v for v in verdicts if v]
    if verdicts:
        lines += ["", f"Target: the {TARGET['num_layers']}-layer SAL-16 MLP reaches at least "
                  f"{100 * TARGET['test_accuracy']:.0f}% with no NaN or inf at any step: "
                  + "; ".join(verdicts) + "."]
    if tries:
        lines += ["", "Tries with other settings (see the commands in the results file):", "",
                  *header, *(_row(r) for r in tries)]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, tries: list[dict] | None = None) -> Path:
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
    for r in tries or []:
        accuracy_axis.plot([r["num_layers"]], [100 * r["test_accuracy"]], marker="*",
                           markersize=12, linestyle="none",
                           label=f"{run_label(r)}, {r['epochs']:g} epochs (try)")
    accuracy_axis.axhline(100 * TARGET["test_accuracy"], color="grey", linestyle=":",
                          label="target (SAL, 128 layers)")
    accuracy_axis.set(xscale="log", xlabel="hidden layers", ylabel="MNIST test accuracy %",
                      title="accuracy")
    time_axis.set(xscale="log", yscale="log", xlabel="hidden layers",
                  ylabel="ms per training step", title=f"step time (batch {BATCH_SIZE})")
    for axis in (accuracy_axis, time_axis):
        axis.set_xticks(list(DEPTHS), [str(d) for d in DEPTHS])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Residual MLP (hidden 256) on MNIST: depth sweep")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def is_sweep(options: argparse.Namespace) -> bool:
    return (sorted(options.depths) == list(DEPTHS) and sorted(options.methods) == sorted(METHODS)
            and options.hidden_act == "relu" and options.learning_rate is None
            and options.epochs is None and not options.quick)


def record(options: argparse.Namespace, argv: list[str], runs: list[dict], seconds: float) -> None:
    """Write the sweep (or add the tries) to the results file, the plot and the doc section."""
    command = ("python benchmarks/depth_sweep.py " + " ".join(argv)).strip()
    if is_sweep(options):
        # A new sweep keeps the tries recorded beside an earlier one, each with its command
        # (and, since it was recorded, its commit): they are results too.
        earlier = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
        document = {
            "benchmark": "depth_sweep", "command": command, "git_commit": git_commit(),
            "date": datetime.date.today().isoformat(), "epochs_per_depth": BUDGET,
            "sweep_wall_time_s": round(seconds), "runs": runs,
            "tries": earlier.get("tries", []),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        }
    else:
        while not RESULTS_FILE.exists():  # a try started while the sweep still ran
            print(f"waiting for the sweep to write {RESULTS_FILE} ...", flush=True)
            time.sleep(60)
        document = json.loads(RESULTS_FILE.read_text())
        for run in runs:
            run["try_command"] = command
            run["try_git_commit"] = git_commit()
        document.setdefault("tries", []).extend(runs)
    write_results(RESULTS_FILE, document)
    render(document)


def render(document: dict) -> None:
    plot(document["runs"], PLOT_FILE, document.get("tries", []))
    body = (markdown_table(document["runs"], document.get("tries", []))
            + "\n\n![accuracy and step time against depth](depth_sweep.png)")
    replace_section("depth_sweep", body, document["command"])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--hidden_act", default="relu", help="activation of the hidden layers")
    parser.add_argument("--learning_rate", type=float, default=None, help="default: recipe's")
    parser.add_argument("--epochs", type=float, default=None, help="default: BUDGET's")
    parser.add_argument("--quick", action="store_true", help="smoke run; writes no results")
    parser.add_argument("--render", action="store_true", help="redraw doc and plot from results")
    parser.add_argument("--output_root", type=Path, default=ROOT / "outputs" / "depth_sweep")
    options = parser.parse_args(argv)
    if options.render:
        render(json.loads(RESULTS_FILE.read_text()))
        return
    unknown = sorted(set(options.depths) - set(BUDGET))
    if unknown:
        parser.error(f"--depths {unknown} have no epoch budget; choose from {sorted(BUDGET)}.")
    epochs = {d: options.epochs or BUDGET[d] for d in BUDGET}
    started = time.time()
    runs = [launch(name, arguments, options.output_root, options.quick)
            for name, arguments in planned_runs(options.depths, options.methods, epochs,
                                                options.learning_rate, options.hidden_act)]
    print(markdown_table(runs))
    if not options.quick:
        record(options, argv, runs, time.time() - started)


if __name__ == "__main__":
    main(sys.argv[1:])
