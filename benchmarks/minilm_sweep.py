"""Validation sweep behind the MiniLM settings of `benchmarks/transformers_bench.py`.

    python benchmarks/minilm_sweep.py            # every run, one at a time (about 2 h, 2 CPU cores)
    python benchmarks/minilm_sweep.py --resume   # keep runs already finished with the same command

Every run is an `accelerate launch` of `recipes/finetune_text_classifier.py` on the benchmark's
budget (150 steps x 16 snippets, max_length 64, the split of seed 0) with `--evaluate_test false`:
settings are chosen on the validation split alone, and the test split is never evaluated here.
Each method gets the same search, stage by stage, each stage starting from the best setting so
far (validation accuracy after the last step):

1. `learning_rate`: the rate of every trained parameter;
2. `head`: `--head_learning_rate_scale` (the head is the pooler and the classifier, new or
   barely used by the pretrained sentence model);
3. `areas` (SAL only): the area learning-rate scale, 2 or 8 areas, the shared path, feedback
   per area;
4. `seeds`: the two best settings of each method again with seeds 1 and 2 (initialisation of the
   classifier and data order; the split stays that of seed 0). The setting chosen is the one
   with the best mean over the three seeds.

Then `diagnosis` trains the chosen SAL setting with parts of the encoder frozen (`--freeze`):
where the feedback learning that helps is. Writes `benchmarks/results/minilm_sweep.json` (every
run's command, settings, seeds and validation accuracy; the choices) and its section of
`docs/results.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_doc import git_commit, replace_section  # benchmarks/ is on sys.path
from transformers_bench import MINILM_BUDGET, SEED, THREADS

from sal_hf.reporting import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "minilm_sweep.json"
OUTPUT_ROOT = ROOT / "outputs" / "minilm_sweep"
METHODS = ("bp", "dfa", "sal")
LEARNING_RATES = {"bp": (3e-5, 5e-5, 1e-4, 2e-4), "dfa": (1e-4, 3e-4, 1e-3),
                  "sal": (1e-4, 3e-4, 1e-3)}
HEAD_SCALES = (3, 10, 30)
# Each SAL variant changes one thing from the best setting of the stages before.
AREA_VARIANTS = {
    "area-lr-0.1": {"area_learning_rate_scale": 0.1},
    "area-lr-0.25": {"area_learning_rate_scale": 0.25},
    "area-lr-1": {"area_learning_rate_scale": 1.0},
    "2-areas": {"num_areas": 2},
    "8-areas": {"num_areas": 8},
    "shared-path": {"shared_path": "true"},
    "area-feedback": {"feedback": "area"},
}
# Where each search starts. Every option the recipe tunes per method is given explicitly, so
# that the runs do not change when the recipe's defaults do (they are this sweep's choices).
START = {
    "bp": {"head_learning_rate_scale": 1},
    "dfa": {"head_learning_rate_scale": 1},
    # The benchmark's SAL before this sweep: 4 areas at 1/sqrt(4) of the learning rate.
    "sal": {"num_areas": 4, "routing": "sample", "area_learning_rate_scale": 0.5,
            "head_learning_rate_scale": 1},
}
CONFIRM_SEEDS = (1, 2)
CONFIRM_TOP = 2
# Parameters frozen in the diagnosis runs (regular expressions on parameter names).
FROZEN_PARTS = {
    "embeddings": r"^bert\.embeddings\.",
    "areas (MLP)": r"intermediate\.dense|layer\.\d+\.output\.dense",
    "attention": r"attention\.",
    "whole encoder (head alone)": r"^bert\.",
}


def command_for(settings: dict, seed: int, output_dir: Path) -> list[str]:
    budget = MINILM_BUDGET
    options = [f"--{name}={value}" for name, value in settings.items()]
    return [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", "accelerate_configs/cpu.yaml",
        "--num_cpu_threads_per_process", str(THREADS), "recipes/finetune_text_classifier.py",
        *options, f"--max_steps={budget['steps']}",
        f"--per_device_train_batch_size={budget['batch_size']}",
        f"--max_length={budget['max_length']}", f"--seed={seed}", f"--split_seed={SEED}",
        "--eval_strategy=steps", f"--eval_steps={budget['steps']}", "--save_strategy=no",
        "--evaluate_test=false", "--disable_tqdm=true", f"--output_dir={output_dir}",
    ]


def run(stage: str, name: str, settings: dict, seed: int, resume: bool) -> dict:
    """One training run; its record (command, settings, validation accuracy)."""
    output_dir = OUTPUT_ROOT / f"{name}-seed{seed}"
    command = command_for(settings, seed, output_dir)
    shown = " ".join(["accelerate", *command[1:]])
    record_file = output_dir / "sweep_run.json"
    if resume and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["command"] == shown:
            print(f"[{name} seed {seed}] finished earlier: reusing it", flush=True)
            return record
    print(f"[{name} seed {seed}] {shown}", flush=True)
    started = time.time()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, cwd=ROOT, check=True, env=environment)
    results = json.loads((output_dir / "results.json").read_text())
    record = {
        "stage": stage, "name": name, "method": settings["method"], "settings": settings,
        "seed": seed, "split_seed": SEED, "command": shown,
        "validation_accuracy": results["best_validation_accuracy"],
        "train_runtime_s": results["train_runtime_s"], "area_usage": results["area_usage"],
        "wall_time_s": round(time.time() - started, 1),
    }
    (output_dir / "model.safetensors").unlink(missing_ok=True)  # 90-180 MB a run, not needed
    record_file.write_text(json.dumps(record) + "\n")
    print(f"[{name} seed {seed}] validation accuracy {record['validation_accuracy']:.4f}",
          flush=True)
    return record


def label(settings: dict) -> str:
    # A freeze pattern may hold "|", which would end a markdown table cell.
    text = " ".join(f"{k}={v}" for k, v in settings.items() if k != "method")
    return text.replace("|", "\\|")


class Sweep:
    """The runs so far, and the best setting of each method on seed 0."""

    def __init__(self, resume: bool) -> None:
        self.resume = resume
        self.runs: list[dict] = []

    def try_settings(self, stage: str, settings: dict, seed: int = SEED) -> dict:
        name = re.sub(r"[^A-Za-z0-9._=,-]+", "", ",".join(f"{k}={v}" for k, v in settings.items()))
        record = run(stage, name, settings, seed, self.resume)
        record["stage"] = stage  # a setting reused from an earlier stage keeps its first stage
        self.runs.append(record)
        return record

    def ranked(self, method: str) -> list[dict]:
        """Distinct settings of `method` tried on seed 0 (not diagnoses), best first."""
        seen, ranked = set(), []
        candidates = [r for r in self.runs if r["method"] == method and r["seed"] == SEED
                      and r["stage"] != "diagnosis"]
        for record in sorted(candidates, key=lambda r: -r["validation_accuracy"]):
            key = json.dumps(record["settings"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                ranked.append(record)
        return ranked

    def best(self, method: str) -> dict:
        return dict(self.ranked(method)[0]["settings"])


def search(sweep: Sweep, method: str) -> None:
    start = {"method": method, **START[method]}
    for rate in LEARNING_RATES[method]:
        sweep.try_settings("learning_rate", {**start, "learning_rate": rate})
    base = sweep.best(method)
    for scale in HEAD_SCALES:
        sweep.try_settings("head", {**base, "head_learning_rate_scale": scale})
    if method == "sal":
        base = sweep.best(method)
        for variant in AREA_VARIANTS.values():
            sweep.try_settings("areas", {**base, **variant})


def confirm(sweep: Sweep, method: str) -> dict:
    """The best of the top settings by their mean validation accuracy over three seeds."""
    candidates = []
    for record in sweep.ranked(method)[:CONFIRM_TOP]:
        accuracies = {SEED: record["validation_accuracy"]}
        for seed in CONFIRM_SEEDS:
            accuracies[seed] = sweep.try_settings("seeds", record["settings"], seed)[
                "validation_accuracy"]
        candidates.append({"settings": record["settings"], "validation_accuracy": accuracies,
                           "mean": statistics.mean(accuracies.values())})
    return max(candidates, key=lambda c: c["mean"])


def diagnose(sweep: Sweep, settings: dict) -> None:
    for pattern in FROZEN_PARTS.values():
        sweep.try_settings("diagnosis", {**settings, "freeze": pattern})


def markdown(sweep: Sweep, chosen: dict) -> str:
    lines = [
        f"Validation accuracy (1,280 snippets) after {MINILM_BUDGET['steps']} steps x "
        f"{MINILM_BUDGET['batch_size']} snippets, max_length {MINILM_BUDGET['max_length']}; "
        f"seed {SEED} unless given; the test split is not evaluated.", "",
        "| stage | method | setting | seed | validation accuracy |", "|---|---|---|---|---|",
    ]
    for r in sweep.runs:
        lines.append(f"| {r['stage']} | {r['method']} | {label(r['settings'])} | {r['seed']} | "
                     f"{100 * r['validation_accuracy']:.2f}% |")
    lines += ["", "| method | chosen setting | validation accuracy, seeds 0 / 1 / 2 | mean |",
              "|---|---|---|---|"]
    for method, choice in chosen.items():
        per_seed = " / ".join(f"{100 * a:.2f}" for a in choice["validation_accuracy"].values())
        lines.append(f"| {method} | {label(choice['settings'])} | {per_seed} | "
                     f"{100 * choice['mean']:.2f}% |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs that finished earlier with the same command")
    options = parser.parse_args(argv)
    started = time.time()
    sweep = Sweep(options.resume)
    for method in METHODS:
        search(sweep, method)
    chosen = {method: confirm(sweep, method) for method in METHODS}
    diagnose(sweep, chosen["sal"]["settings"])
    table = markdown(sweep, chosen)
    print(table)
    write_results(RESULTS_FILE, {
        "benchmark": "minilm_sweep", "command": "python benchmarks/minilm_sweep.py",
        "date": datetime.date.today().isoformat(), "git_commit": git_commit(),
        "budget": MINILM_BUDGET, "split_seed": SEED, "threads_per_run": THREADS,
        "selection": "validation accuracy after the last step; the final choice by the mean "
        f"over seeds {SEED}, {', '.join(map(str, CONFIRM_SEEDS))}",
        "chosen": chosen, "runs": sweep.runs, "wall_time_s": round(time.time() - started, 1),
    })
    replace_section("minilm_sweep", table, "python benchmarks/minilm_sweep.py")


if __name__ == "__main__":
    main(sys.argv[1:])
