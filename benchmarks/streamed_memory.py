"""Benchmark: peak memory of one training step of a deep MLP, SAL plain and streamed beside BP.

    python benchmarks/streamed_memory.py                   # 32 and 128 layers (minutes)
    python benchmarks/streamed_memory.py --layers 16 --no_write   # a quick look, writes nothing

"Streamed" is SAL with activation checkpointing: each region keeps only its input during the
forward pass and is recomputed while its update is applied (docs/method.md). Every mode runs in
this one process on the depth sweep's residual MLP (hidden 256, ReLU) and the same batch, one
mode after the other. The figure is `PeakMemory.peak_increase_mb`: the rise of resident memory
during forward and backward over the memory at the step's start. Parameters and gradients are
allocated before the step (gradients zeroed, not freed), so the rise is what the step adds:
activations and the transient tensors of the backward pass. The optimizer step is left out; it
is the same for both SAL modes.

Resident memory follows the live tensors only if freed memory goes back to the system: glibc keeps
freed blocks for reuse, so a second step would show no rise at all. The benchmark therefore sets
glibc's mmap threshold low (every tensor larger than 64 KiB gets its own mapping, returned to the
system when freed) and trims the heap before each step. This makes allocation slower, so the step
times printed here are not step-time figures (see the depth sweep for those).

Also checks that streamed and plain SAL give identical gradients on the same weights and batch.
Writes `benchmarks/results/streamed_memory.json` and a section of `docs/results.md`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from cpu_memory import release_freed_memory_to_system  # benchmarks/ is on sys.path as a script
from results_doc import replace_section

from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal
from sal_hf.reporting import PeakMemory, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = ROOT / "benchmarks" / "results" / "streamed_memory.json"
MODES = {  # label: (SALConfig method, gradient checkpointing)
    "SAL-16 plain": ("sal", False),
    "SAL-16 streamed": ("sal", True),
    "BP": ("bp", False),
}
TARGET_RATIO = 0.5  # streamed SAL at the deepest depth, over BP (the project's issue)

def build_model(method: str, streamed: bool, num_layers: int, hidden_size: int,
                seed: int = 0) -> MLPForImageClassification:
    """The MLP classifier, converted, with gradients allocated (zero) on every parameter."""
    torch.manual_seed(seed)
    # The depth sweep's model: residual hidden layers; SAL-16 with its shared path.
    config = MLPClassifierConfig(hidden_size=hidden_size, num_layers=num_layers, num_labels=10,
                                 residual=True)
    sal_config = SALConfig(method=method, shared_path=method == "sal")
    model = convert_to_sal(MLPForImageClassification(config), sal_config).train()
    if streamed:
        model.activation_checkpointing_enable()  # non-reentrant: region inputs are detached
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    return model


def forward_backward(model: MLPForImageClassification, inputs: torch.Tensor,
                     labels: torch.Tensor) -> None:
    """One step's forward and single backward (task loss plus router loss, as SALTrainer)."""
    loss = model(pixel_values=inputs, labels=labels).loss
    router_loss = model.sal_controller.router_loss()
    (loss if router_loss is None else loss + router_loss).backward()


def model_state_mb(model: torch.nn.Module) -> float:
    """Parameters plus their gradients, in MiB (held before and after every step)."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def measure_mode(libc: ctypes.CDLL, method: str, streamed: bool, num_layers: int,
                 hidden_size: int, batch: tuple[torch.Tensor, torch.Tensor],
                 repeats: int) -> dict:
    """Median peak rise over `repeats` steps (after one warm-up step) of one mode."""
    model = build_model(method, streamed, num_layers, hidden_size)
    rises, times = [], []
    for repeat in range(repeats + 1):
        model.zero_grad(set_to_none=False)
        libc.malloc_trim(0)
        with PeakMemory() as memory:
            started = time.perf_counter()
            forward_backward(model, *batch)
            elapsed = time.perf_counter() - started
        if repeat > 0:
            rises.append(memory.peak_increase_mb)
            times.append(elapsed)
    return {
        "peak_step_memory_mb": round(statistics.median(rises), 1),
        "peak_step_memory_mb_each": [round(rise, 1) for rise in rises],
        "model_state_mb": round(model_state_mb(model), 1),
        "step_time_s_under_mmap": round(statistics.median(times), 2),
    }


def gradient_difference(num_layers: int, hidden_size: int,
                        batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |gradient difference| between streamed and plain SAL on the same weights."""
    plain = build_model("sal", False, num_layers, hidden_size)
    streamed = build_model("sal", True, num_layers, hidden_size)
    streamed.load_state_dict(plain.state_dict())
    for model in (plain, streamed):
        model.zero_grad(set_to_none=False)
        forward_backward(model, *batch)
    return max(
        float((a.grad - b.grad).abs().max())
        for a, b in zip(plain.parameters(), streamed.parameters(), strict=True)
    )


def run(depths: list[int], hidden_size: int, batch_size: int, repeats: int) -> dict:
    libc = release_freed_memory_to_system()
    torch.manual_seed(0)
    batch = (torch.rand(batch_size, 784), torch.randint(0, 10, (batch_size,)))
    rows = []
    for num_layers in depths:
        for label, (method, streamed) in MODES.items():
            figures = measure_mode(libc, method, streamed, num_layers, hidden_size, batch,
                                   repeats)
            rows.append({"num_layers": num_layers, "mode": label, **figures})
            print(f"{num_layers:4d} layers  {label:16s} {figures}", flush=True)
    check_layers = min(depths)
    difference = gradient_difference(check_layers, hidden_size, batch)
    print(f"max |grad(streamed) - grad(plain)| at {check_layers} layers: {difference}")
    return {
        "rows": rows, "ratios": ratios(rows), "hidden_size": hidden_size,
        "tensors_per_layer": tensors_per_layer(rows, batch_size * hidden_size * 4 / 2**20),
        "batch_size": batch_size, "repeats": repeats,
        "gradient_check": {"num_layers": check_layers, "max_abs_difference": difference},
        "target": f"SAL-16 streamed at {max(depths)} layers <= {TARGET_RATIO} x BP",
    }


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per depth: streamed / BP, plain / BP and streamed / plain peak step memory."""
    result = {}
    for num_layers in sorted({row["num_layers"] for row in rows}):
        peak = {r["mode"]: r["peak_step_memory_mb"] for r in rows
                if r["num_layers"] == num_layers}
        bp = max(peak["BP"], 1e-6)
        result[str(num_layers)] = {
            "streamed_over_bp": round(peak["SAL-16 streamed"] / bp, 3),
            "plain_over_bp": round(peak["SAL-16 plain"] / bp, 3),
            "streamed_over_plain": round(
                peak["SAL-16 streamed"] / max(peak["SAL-16 plain"], 1e-6), 3
            ),
        }
    return result


def tensors_per_layer(rows: list[dict], tensor_mb: float) -> dict[str, float] | None:
    """Per mode, the memory one more layer adds, in `[batch, hidden]` fp32 tensors (from the
    shallowest and deepest depth measured)."""
    depths = sorted({row["num_layers"] for row in rows})
    if len(depths) < 2:
        return None
    peak = {(r["mode"], r["num_layers"]): r["peak_step_memory_mb"] for r in rows}
    low, high = depths[0], depths[-1]
    return {
        mode: round((peak[mode, high] - peak[mode, low]) / (high - low) / tensor_mb, 2)
        for mode in MODES
    }


def markdown(document: dict) -> str:
    deepest = str(max(row["num_layers"] for row in document["rows"]))
    ratio = document["ratios"][deepest]["streamed_over_bp"]
    met = "met" if ratio <= TARGET_RATIO else "missed"
    lines = [
        f"Residual MLP (the depth sweep's), hidden {document['hidden_size']}, batch "
        f"{document['batch_size']}; SAL-16 with its shared path; peak rise of "
        "resident memory during forward + backward (parameters and gradients allocated "
        f"beforehand), median of {document['repeats']} steps after a warm-up, one process.",
        "",
        "| layers | mode | peak step memory MB | x BP | params + grads MB |",
        "|---|---|---|---|---|",
    ]
    for row in document["rows"]:
        peak = {r["mode"]: r["peak_step_memory_mb"] for r in document["rows"]
                if r["num_layers"] == row["num_layers"]}
        lines.append(
            f"| {row['num_layers']} | {row['mode']} | {row['peak_step_memory_mb']:.0f} | "
            f"{row['peak_step_memory_mb'] / max(peak['BP'], 1e-6):.2f} | "
            f"{row['model_state_mb']:.0f} |"
        )
    check = document["gradient_check"]
    slopes = document["tensors_per_layer"]
    if slopes:
        lines += ["", "Memory one more layer adds, in `[batch, hidden]` fp32 tensors: "
                  + ", ".join(f"{mode} {slope:.2f}" for mode, slope in slopes.items()) + "."]
    lines += [
        "",
        f"Target: {document['target']}: **{met}** (ratio {ratio:.2f}).",
        f"Streamed and plain SAL gradients at {check['num_layers']} layers: largest absolute "
        f"difference {check['max_abs_difference']:g}.",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_FILE)
    parser.add_argument("--no_write", action="store_true", help="print only; write no files")
    parser.add_argument("--no_doc", action="store_true", help="write the JSON, not the doc")
    options = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    started = time.time()
    document = run(options.layers, options.hidden_size, options.batch_size, options.repeats)
    command = "python benchmarks/streamed_memory.py " + " ".join(argv)
    document.update({
        "benchmark": "streamed_memory", "command": command.strip(),
        "date": datetime.date.today().isoformat(), "runtime_s": round(time.time() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    })
    print(markdown(document))
    if options.no_write:
        return
    write_results(options.output, document)
    if not options.no_doc:
        replace_section("streamed_memory", markdown(document), document["command"])


if __name__ == "__main__":
    main(sys.argv[1:])
