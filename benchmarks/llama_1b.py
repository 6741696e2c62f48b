"""Benchmark: real training steps of a 1.0B-parameter SAL Llama on two CPU processes, ZeRO-3.

    python benchmarks/llama_1b.py                  # 20 steps (about 20 minutes on 2 CPU cores)
    python benchmarks/llama_1b.py --max_steps 3 --num_layers 2 --no_write   # a smoke run

Runs `recipes/train_llama_1b.py` under `accelerate launch` with `accelerate_configs/cpu_zero3.yaml`
(DeepSpeed ZeRO-3, two processes, gloo) and the recipe's defaults, then writes
`benchmarks/results/llama_1b.json` and the `llama_1b` section of `docs/results.md`: total
parameters and parameters active per token, peak memory per process, step time, the gradient
norm before clipping, area usage per layer, and the loss at every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_doc import replace_section  # benchmarks/ is on the path when run as a script

from sal_hf.reporting import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "llama_1b.json"
CONFIG = "accelerate_configs/cpu_zero3.yaml"


def launch(options: argparse.Namespace) -> tuple[dict, str]:
    """Run the recipe; return its results and the command line as a user would type it."""
    output_dir = options.output_root / "llama-1b"
    arguments = ["--max_steps", str(options.max_steps), "--output_dir", str(output_dir)]
    if options.num_layers is not None:
        arguments += ["--num_layers", str(options.num_layers)]
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", CONFIG,
        "--main_process_port", str(options.port), "recipes/train_llama_1b.py", *arguments,
    ]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    results = json.loads((output_dir / "results.json").read_text())
    shown = " ".join(["accelerate", *command[1:]]).replace(str(ROOT) + "/", "")
    return results, shown


def _lowest_balance(entry: dict) -> str:
    ratios = entry.get("area_entropy_ratio") or {}
    return f"{min(ratios.values()):.2f}" if ratios else "-"


def loss_table(results: dict) -> list[str]:
    """The per-step figures as one compact table, ten steps a row."""
    steps = results["steps"]
    lines = ["| steps | task loss (cross-entropy, nats per character) | with router terms "
             "| gradient norm before clipping | lowest H/logK over layers (training) |",
             "|---|---|---|---|---|"]
    for start in range(0, len(steps), 10):
        chunk = steps[start:start + 10]
        task = " ".join(f"{entry['task_loss']:.3f}" for entry in chunk)
        total = " ".join(f"{entry['loss']:.2f}" for entry in chunk)
        norms = " ".join(f"{entry['grad_norm']:.1f}" if entry.get("grad_norm") is not None
                         else "-" for entry in chunk)
        balance = " ".join(_lowest_balance(entry) for entry in chunk)
        lines.append(f"| {chunk[0]['step']}-{chunk[-1]['step']} | {task} | {total} | {norms} "
                     f"| {balance} |")
    return lines


def gradient_rows(results: dict) -> list[str]:
    """The gradient norm before clipping, and how much of each update clipping keeps."""
    norms = [entry["grad_norm"] for entry in results["steps"] if entry.get("grad_norm")]
    limit = results.get("max_grad_norm")
    if not norms:
        return []
    rows = [f"| gradient norm before clipping, median (lowest - highest) | "
            f"{statistics.median(norms):.1f} ({min(norms):.1f} - {max(norms):.1f}) |"]
    if limit:
        kept = [min(1.0, limit / norm) for norm in norms]
        rows.append(f"| share of the update kept by clipping to max_grad_norm {limit:g}, median | "
                    f"{statistics.median(kept):.3f} |")
    return rows


def usage_rows(results: dict) -> list[str]:
    """Area usage per layer: after training on the validation blocks, and during training."""
    rows = []
    usage = results.get("area_usage") or {}
    if usage:
        ratios = [layer["entropy_ratio"] for layer in usage.values()]
        rows.append(
            f"| area usage on the validation blocks after training: H/logK lowest / median over "
            f"{len(ratios)} layers; largest share of one area | {min(ratios):.3f} / "
            f"{statistics.median(ratios):.3f}; "
            f"{max(layer['max_share'] for layer in usage.values()):.3f} |"
        )
    trained = [(ratio, entry["step"], name) for entry in results["steps"]
               for name, ratio in (entry.get("area_entropy_ratio") or {}).items()]
    if trained:
        ratio, step, name = min(trained)
        rows.append(f"| area usage during training: lowest H/logK of a layer at a step | "
                    f"{ratio:.3f} ({name}, step {step}) |")
    return rows


def markdown(results: dict) -> str:
    memory = results["memory_per_rank"]
    peaks = ", ".join(f"rank {rank}: {m['peak_memory_mb'] / 1024:.2f} GiB"
                      for rank, m in enumerate(memory))
    held = memory[0]["held_parameters"]
    steps = results["steps"]
    evaluations = results["evaluations"]
    lines = [
        f"Llama architecture, hidden {results['hidden_size']}, {results['num_layers']} layers, "
        f"{results['num_heads']} heads, MLP {results['intermediate_size']}; every MLP projection "
        f"an area layer of {results['num_areas']} areas, {results['routing']} routing. "
        f"Shakespeare, one token per character ({results['vocab_size']} tokens), blocks of "
        f"{results['block_size']}. {results['distributed_type']} ZeRO-{results['zero_stage']}, "
        f"{results['num_processes']} CPU processes ({results['model_wrapper']}), "
        f"{'streamed' if results['streamed_regions'] else 'plain'} regions, "
        f"{results['optimizer'].upper()} lr {results['learning_rate']:g} "
        f"({results['lr_scheduler_type']}), {results['tokens_per_step']} tokens per step."
        + router_settings(results),
        "",
        "| | |", "|---|---|",
        f"| total parameters | {results['total_parameters']:,} |",
        f"| parameters active per token | {results['active_parameters_per_token']:,} |",
        f"| parameters held per process (ZeRO-3 partition) | {held:,} |",
        f"| peak memory per process (resident, during training) | {peaks} |",
        f"| step time (median; first step) | {results['median_step_time_s']:.1f} s; "
        f"{results['first_step_time_s']:.1f} s |",
        f"| task loss, step 1 -> {steps[-1]['step']} | {steps[0]['task_loss']:.3f} -> "
        f"{steps[-1]['task_loss']:.3f} |",
        f"| loss with the routers' local terms, step 1 -> {steps[-1]['step']} (highest) | "
        f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} "
        f"({max(entry['loss'] for entry in steps):.3f}, step "
        f"{max(steps, key=lambda entry: entry['loss'])['step']}) |",
    ]
    if len(evaluations) >= 2:
        lines.append(f"| validation loss ({results.get('eval_blocks', '')} held-out blocks), "
                     f"before -> after | {evaluations[0]['eval_loss']:.3f} -> "
                     f"{evaluations[-1]['eval_loss']:.3f} |")
    lines += gradient_rows(results) + usage_rows(results)
    lines.append(f"| wall time of `train` | {results['train_runtime_s']:.0f} s |")
    notes = ["", "H/logK: a layer's area-usage entropy over log(areas); 1 is uniform usage."]
    return "\n".join(lines + notes + [""] + loss_table(results))


def router_settings(results: dict) -> str:
    if "balance_loss_weight" not in results:
        return ""
    return (f" Routers: prototype term x{results['prototype_loss_weight']:g}, balance term "
            f"x{results['balance_loss_weight']:g}, centring momentum "
            f"{results['router_momentum']:g}.")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--num_layers", type=int, default=None, help="smaller runs only")
    parser.add_argument("--port", type=int, default=29531, help="loopback rendezvous port")
    parser.add_argument("--output_root", type=Path, default=ROOT / "outputs" / "benchmarks")
    parser.add_argument("--no_write", action="store_true", help="print only; write no files")
    parser.add_argument("--render", action="store_true", help="redraw the doc from the results")
    options = parser.parse_args(argv)
    if options.render:
        document = json.loads(RESULTS_FILE.read_text())
        replace_section("llama_1b", markdown(document), document["command"])
        return
    started = time.time()
    results, command = launch(options)
    document = {
        "benchmark": "llama_1b", "command": command, "date": datetime.date.today().isoformat(),
        "wall_time_s": round(time.time() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", **results,
    }
    print(markdown(document))
    if options.no_write:
        return
    write_results(RESULTS_FILE, document)
    replace_section("llama_1b", markdown(document), command)


if __name__ == "__main__":
    main(sys.argv[1:])
