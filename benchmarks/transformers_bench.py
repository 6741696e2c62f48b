"""Benchmark: SAL beside backprop (BP) and DFA on transformers, same model, data and budget.

    python benchmarks/transformers_bench.py                # every run (about 40 min, 2 CPU cores)
    python benchmarks/transformers_bench.py --only gpt2    # one task: minilm or gpt2
    python benchmarks/transformers_bench.py --quick        # a smoke run; writes no results
    python benchmarks/transformers_bench.py --resume       # keep runs already finished

- MiniLM (all-MiniLM-L6-v2, pretrained) fine-tuned on Rotten Tomatoes by
  `recipes/finetune_text_classifier.py`: test accuracy of SAL against BP fine-tuning.
- A 6-layer GPT-2 (d_model 256) trained from scratch on Shakespeare by
  `recipes/train_causal_lm.py`: validation perplexity, all methods on the same tokens.
- SAL's and BP's training throughput and peak memory on that GPT-2, measured in one process with
  their steps interleaved, so that both see the same machine load.

Every run is an `accelerate launch` of a recipe. Writes `benchmarks/results/transformers.json`
(commands, seeds, date, git commit, every run's results) and the table in `docs/results.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_doc import git_commit, replace_section  # benchmarks/ is on sys.path
from transformers import GPT2Config, GPT2LMHeadModel

from sal_hf import SALConfig, convert_to_sal, parameter_counts
from sal_hf.reporting import PeakMemory, run_label, usage_entropy_ratio, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "transformers.json"
SEED = 0

# The budgets: every method of a task trains on exactly the same samples or tokens.
MINILM_BUDGET = dict(steps=150, batch_size=16, max_length=64)
GPT2_MODEL = dict(num_layers=6, hidden_size=256, num_heads=8, block_size=128, vocab_size=8192)
GPT2_BUDGET = dict(steps=200, batch_size=8)
# One thread per process: on a small machine shared with other work, two threads per process
# oversubscribe the cores and make every step several times slower.
THREADS = 1
# The SAL setting benchmarked (chosen by the cheap trials listed in docs/results.md).
SAL_MINILM = ["--num_areas", "4", "--routing", "sample"]
SAL_GPT2 = ["--num_areas", "4", "--routing", "token"]
# From the project's issue.
TARGETS = {
    "minilm_accuracy_gap_points": 2.0,  # SAL test accuracy at most this far below BP's
    "gpt2_perplexity_ratio": 1.3,  # SAL validation perplexity at most this times BP's
    "gpt2_throughput_ratio": 1.0,  # SAL tokens/s at least this times BP's
}


def minilm_runs() -> list[tuple[str, list[str]]]:
    budget = ["--max_steps", str(MINILM_BUDGET["steps"]),
              "--per_device_train_batch_size", str(MINILM_BUDGET["batch_size"]),
              "--max_length", str(MINILM_BUDGET["max_length"]), "--eval_strategy", "no"]
    return [
        ("minilm-bp", ["--method", "bp", *budget]),
        ("minilm-dfa", ["--method", "dfa", *budget]),
        ("minilm-sal", ["--method", "sal", *SAL_MINILM, *budget]),
    ]


def gpt2_runs() -> list[tuple[str, list[str]]]:
    model = ["--arch", "gpt2", "--corpus", "shakespeare", "--tokenizer", "bpe"]
    model += [f"--{name}={value}" for name, value in GPT2_MODEL.items()]
    budget = ["--max_steps", str(GPT2_BUDGET["steps"]),
              "--per_device_train_batch_size", str(GPT2_BUDGET["batch_size"]),
              "--eval_strategy", "no"]  # one evaluation, after training
    return [
        ("gpt2-bp", ["--method", "bp", *model, *budget]),
        ("gpt2-dfa", ["--method", "dfa", *model, *budget]),
        ("gpt2-sal", ["--method", "sal", *SAL_GPT2, *model, *budget]),
    ]


RECIPES = {"minilm": ("finetune_text_classifier", minilm_runs),
           "gpt2": ("train_causal_lm", gpt2_runs)}


def launch(task: str, name: str, arguments: list[str], output_root: Path, quick: bool,
           resume: bool = False) -> dict:
    recipe = RECIPES[task][0]
    output_dir = output_root / name
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", "accelerate_configs/cpu.yaml",
        "--num_cpu_threads_per_process", str(THREADS), f"recipes/{recipe}.py", *arguments,
        "--seed", str(SEED), "--output_dir", str(output_dir), "--disable_tqdm", "true",
    ]
    if quick:
        command += ["--max_steps", "3", "--eval_strategy", "no", "--limit",
                    "64" if task == "minilm" else "200000"]
    shown = " ".join(["accelerate", *command[1:]])
    record = output_dir / "benchmark_run.json"  # the command and wall time, once it finished
    if resume and record.is_file() and json.loads(record.read_text())["command"] == shown:
        print(f"[{name}] finished earlier with the same command: reusing it", flush=True)
        return {**json.loads((output_dir / "results.json").read_text()),
                **json.loads(record.read_text()), "task": task, "run": name}
    print(f"[{name}] {shown}", flush=True)
    started = time.time()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, cwd=ROOT, check=True, env=environment)
    results = json.loads((output_dir / "results.json").read_text())
    finished = {"command": shown, "wall_time_s": round(time.time() - started, 1)}
    record.write_text(json.dumps(finished) + "\n")
    results.update(task=task, run=name, **finished)
    metric = "test_accuracy" if task == "minilm" else "eval_perplexity"
    print(f"[{name}] {metric} {results[metric]:.4f}", flush=True)
    return results


def gpt2_step_cost(steps: int, warmup: int = 2) -> dict:
    """Tokens per second and peak memory of SAL and BP on the benchmark's GPT-2, one process.

    Steps alternate between the two models so both see the same machine load; each step is a
    forward, the one backward and an AdamW update on `batch_size` x `block_size` tokens.
    """
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)  # as the recipe runs
    batch, block = GPT2_BUDGET["batch_size"], GPT2_MODEL["block_size"]
    tokens = torch.randint(0, GPT2_MODEL["vocab_size"], (batch, block))
    sal_options = dict(zip(SAL_GPT2[::2], SAL_GPT2[1::2], strict=True))
    settings = {"sal": SALConfig(method="sal", num_areas=int(sal_options["--num_areas"]),
                                 routing=sal_options["--routing"]),
                "bp": SALConfig(method="bp")}
    models, optimizers = {}, {}
    for method, sal_config in settings.items():
        config = GPT2Config(
            vocab_size=GPT2_MODEL["vocab_size"], n_positions=block,
            n_embd=GPT2_MODEL["hidden_size"], n_layer=GPT2_MODEL["num_layers"],
            n_head=GPT2_MODEL["num_heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )
        models[method] = convert_to_sal(GPT2LMHeadModel(config), sal_config).train()
        # Fused, as the Trainer's default optimizer (`adamw_torch_fused`) is.
        optimizers[method] = torch.optim.AdamW(models[method].parameters(), lr=1e-3, fused=True)
    timings: dict[str, list[float]] = {method: [] for method in models}
    memory: dict[str, float] = {}
    for step in range(steps + warmup):
        for method, model in models.items():
            with PeakMemory() as peak:
                started = time.perf_counter()
                loss = model(input_ids=tokens, labels=tokens).loss
                router_loss = model.sal_controller.router_loss()
                (loss if router_loss is None else loss + router_loss).backward()
                optimizers[method].step()
                optimizers[method].zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - started
            if step >= warmup:
                timings[method].append(elapsed)
                memory[method] = max(memory.get(method, 0.0), peak.peak_increase_mb)
    return _cost_summary(models, timings, memory, batch * block)


def _cost_summary(models: dict, timings: dict, memory: dict, tokens_per_step: int) -> dict:
    median = {method: sorted(times)[len(times) // 2] for method, times in timings.items()}
    # Parameters, gradients and AdamW's two moments, float32: what a step keeps resident.
    state = {method: 16 * parameter_counts(model)["total"] / 2**20
             for method, model in models.items()}
    speed = {method: tokens_per_step / median[method] for method in models}
    # The same ratio step by step (BP's time over SAL's, the two steps taken back to back): its
    # quartiles say how far the median ratio stands from 1 against the machine's noise.
    pairs = sorted(b / s for s, b in zip(timings["sal"], timings["bp"], strict=True))
    quartiles = [round(pairs[int(q * (len(pairs) - 1))], 3) for q in (0.25, 0.5, 0.75)]
    return {
        "tokens_per_step": tokens_per_step, "steps": len(timings["sal"]),
        "sal_tokens_per_second": round(speed["sal"], 1),
        "bp_tokens_per_second": round(speed["bp"], 1),
        "throughput_ratio_sal_over_bp": round(speed["sal"] / speed["bp"], 3),
        "step_pair_ratio_quartiles": quartiles,
        "sal_step_memory_mb": round(memory["sal"], 1), "bp_step_memory_mb": round(memory["bp"], 1),
        "step_memory_ratio_sal_over_bp": round(memory["sal"] / max(memory["bp"], 1e-6), 3),
        "sal_state_memory_mb": round(state["sal"], 1), "bp_state_memory_mb": round(state["bp"], 1),
        "state_memory_ratio_sal_over_bp": round(state["sal"] / state["bp"], 3),
        "memory_measure": "step: rise of resident memory during one step (CPU); state: "
        "parameters, gradients and AdamW moments in float32",
    }


def verdicts(runs: list[dict], cost: dict | None) -> dict:
    """Each target of the issue, with the measured value and whether it is met."""
    by_run = {run["run"]: run for run in runs}
    found = {}
    if {"minilm-sal", "minilm-bp"} <= by_run.keys():
        gap = 100 * (by_run["minilm-bp"]["test_accuracy"] - by_run["minilm-sal"]["test_accuracy"])
        limit = TARGETS["minilm_accuracy_gap_points"]
        found["minilm_accuracy_gap_points"] = dict(value=round(gap, 2), target=f"<= {limit}",
                                                   met=gap <= limit)
    if {"gpt2-sal", "gpt2-bp"} <= by_run.keys():
        ratio = by_run["gpt2-sal"]["eval_perplexity"] / by_run["gpt2-bp"]["eval_perplexity"]
        limit = TARGETS["gpt2_perplexity_ratio"]
        found["gpt2_perplexity_ratio"] = dict(value=round(ratio, 3), target=f"<= {limit}",
                                              met=ratio <= limit)
    if cost is not None:
        ratio, limit = cost["throughput_ratio_sal_over_bp"], TARGETS["gpt2_throughput_ratio"]
        found["gpt2_throughput_ratio"] = dict(value=ratio, target=f">= {limit}",
                                              met=ratio >= limit)
    return found


def _usage(results: dict) -> str:
    """The most unbalanced SAL layer on the evaluation set: lowest H/log K, largest share."""
    layers = list(results.get("area_usage", {}).values())
    if not layers:
        return "one area"
    entropies = [usage_entropy_ratio(fractions) for fractions in layers]
    return f"min H/logK {min(entropies):.3f}, max share {max(max(f) for f in layers):.3f}"


def _setting(run: dict) -> str:
    head = run.get("head_learning_rate_scale")
    head = f", head x{head:g}" if head not in (None, 1.0) else ""
    if run["num_areas"] < 2:
        return f"lr {run['learning_rate']:g}{head}"
    return (f"lr {run['learning_rate']:g} (areas x{run['area_learning_rate_scale']:.2f}{head}), "
            f"{run['routing']} routing")


def _row_common(run: dict) -> str:
    return (f"{run['train_runtime_s']:.0f} | {run['step_time_ms'] / 1000:.2f} | "
            f"{run['tokens_per_second']:.0f} | {run['peak_memory_mb']:.0f} | "
            f"{run['total_parameters'] / 1e6:.1f}M / {run['active_parameters'] / 1e6:.1f}M | "
            f"{_usage(run)} |")


def minilm_table(runs: list[dict]) -> list[str]:
    bp = next((r for r in runs if r["run"] == "minilm-bp"), None)
    budget = MINILM_BUDGET
    lines = [
        f"**MiniLM on Rotten Tomatoes** (all-MiniLM-L6-v2, pretrained; {budget['steps']} steps "
        f"x {budget['batch_size']} snippets = {budget['steps'] * budget['batch_size']:,} samples "
        f"per method, max_length {budget['max_length']}; test set 1,282 snippets; seed {SEED}; "
        "each method's settings chosen on the validation split by `benchmarks/minilm_sweep.py`)",
        "", "| run | test accuracy | vs BP (points) | setting | train time s | step s | "
        "tokens/s | peak MB | params total / active | area usage (test) |", "|" + "---|" * 10,
    ]
    for run in runs:
        gap = "" if bp is None else f"{100 * (run['test_accuracy'] - bp['test_accuracy']):+.2f}"
        lines.append(f"| {run_label(run)} | {100 * run['test_accuracy']:.2f}% | {gap} | "
                     f"{_setting(run)} | " + _row_common(run))
    return lines


def gpt2_table(runs: list[dict]) -> list[str]:
    bp = next((r for r in runs if r["run"] == "gpt2-bp"), None)
    first = runs[0]
    tokens = GPT2_BUDGET["steps"] * GPT2_BUDGET["batch_size"] * GPT2_MODEL["block_size"]
    lines = [
        f"**GPT-2 on Shakespeare** ({GPT2_MODEL['num_layers']} layers, d_model "
        f"{GPT2_MODEL['hidden_size']}, from scratch; byte-level BPE of {first['vocab_size']:,} "
        f"tokens trained on the training text; {GPT2_BUDGET['steps']} steps x "
        f"{GPT2_BUDGET['batch_size']} x {GPT2_MODEL['block_size']} = {tokens:,} tokens per "
        f"method ({first['epochs']:.2f} epoch); validation: the last 5% of the corpus; "
        f"seed {SEED})",
        "", "| run | validation perplexity | / BP | eval loss | setting | train time s | "
        "step s | tokens/s | peak MB | params total / active | area usage (validation) |",
        "|" + "---|" * 11,
    ]
    for run in runs:
        ratio = "" if bp is None else f"{run['eval_perplexity'] / bp['eval_perplexity']:.3f}"
        lines.append(f"| {run_label(run)} | {run['eval_perplexity']:.2f} | {ratio} | "
                     f"{run['eval_loss']:.4f} | {_setting(run)} | " + _row_common(run))
    return lines


def cost_table(cost: dict) -> list[str]:
    return [
        f"**SAL against BP on the same GPT-2, one process** (median of {cost['steps']} "
        f"interleaved steps of {cost['tokens_per_step']:,} tokens: forward, backward, fused AdamW)",
        "", "| | SAL | BP | SAL / BP |", "|---|---|---|---|",
        f"| training tokens/s | {cost['sal_tokens_per_second']} | "
        f"{cost['bp_tokens_per_second']} | {cost['throughput_ratio_sal_over_bp']} |",
        *([f"| the same ratio step by step (BP's step time / SAL's, back to back): quartiles "
           f"| | | {' / '.join(map(str, cost['step_pair_ratio_quartiles']))} |"]
          if cost.get("step_pair_ratio_quartiles") else []),
        f"| peak memory of a step, MB | {cost['sal_step_memory_mb']} | "
        f"{cost['bp_step_memory_mb']} | {cost['step_memory_ratio_sal_over_bp']} |",
        f"| parameters, gradients and AdamW state, MB | {cost['sal_state_memory_mb']} | "
        f"{cost['bp_state_memory_mb']} | {cost['state_memory_ratio_sal_over_bp']} |",
    ]


def targets_table(found: dict) -> list[str]:
    names = {"minilm_accuracy_gap_points": "MiniLM: BP accuracy minus SAL accuracy (points)",
             "gpt2_perplexity_ratio": "GPT-2: SAL perplexity / BP perplexity",
             "gpt2_throughput_ratio": "GPT-2: SAL tokens/s / BP tokens/s"}
    lines = ["| target (from the issue) | measured | target | met |", "|---|---|---|---|"]
    for key, verdict in found.items():
        lines.append(f"| {names[key]} | {verdict['value']} | {verdict['target']} | "
                     f"{'yes' if verdict['met'] else '**no**'} |")
    return lines


def markdown(runs: list[dict], cost: dict | None, found: dict) -> str:
    sections = [targets_table(found)]
    for task, table in (("minilm", minilm_table), ("gpt2", gpt2_table)):
        task_runs = [run for run in runs if run["task"] == task]
        if task_runs:
            sections.append(table(task_runs))
    if cost is not None:
        sections.append(cost_table(cost))
    sections.append([
        "Step s and tokens/s of the runs are their own training steps (evaluation excluded) on "
        "a machine shared with other work; the interleaved measurement above is the fair "
        "throughput comparison. Peak MB is the resident memory of the whole run's process. "
        "Area usage: the most unbalanced SAL layer (H/logK = 1 is uniform usage)."
    ])
    return "\n\n".join("\n".join(lines) for lines in sections)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--quick", action="store_true", help="smoke run; writes no results")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs that finished earlier with the same command")
    parser.add_argument("--output_root", type=Path,
                        default=ROOT / "outputs" / "benchmarks" / "transformers")
    options = parser.parse_args(argv)
    started = time.time()
    runs = [launch(task, name, arguments, options.output_root, options.quick, options.resume)
            for task in ("minilm", "gpt2") if task in options.only
            for name, arguments in RECIPES[task][1]()]
    cost = gpt2_step_cost(steps=2 if options.quick else 60) if "gpt2" in options.only else None
    found = verdicts(runs, cost)
    table = markdown(runs, cost, found)
    print(table)
    if options.quick:
        return
    command = " ".join(["python benchmarks/transformers_bench.py",
                        *[argument for argument in argv if argument != "--resume"]])
    document = {
        "benchmark": "transformers", "command": command,
        "date": datetime.date.today().isoformat(), "git_commit": git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{THREADS} thread per run", "seed": SEED,
        "budgets": {"minilm": MINILM_BUDGET, "gpt2_model": GPT2_MODEL, "gpt2": GPT2_BUDGET},
        "sal_settings": {"minilm": SAL_MINILM, "gpt2": SAL_GPT2},
        "targets": found, "runs": runs, "gpt2_step_cost": cost,
        "wall_time_s": round(time.time() - started, 1),
    }
    write_results(RESULTS_FILE, document)
    replace_section("transformers", table, command)


if __name__ == "__main__":
    main(sys.argv[1:])
