"""Ablation: the learning-rate scale of area weights, SAL-16 on MNIST beside DFA.

    python benchmarks/area_lr_scale.py

A plain PyTorch loop (AdamW, batch 128, lr 3e-3 one-cycle, clipping at 1.0, 3 epochs, 2 x 256
MLP), so the only difference between runs is the area weights' learning-rate multiplier.
Writes `benchmarks/results/area_lr_scale.json` and a table in `docs/results.md`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from results_doc import replace_section

from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal
from sal_hf.areas import AreaLinear
from sal_hf.data import load_image_dataset
from sal_hf.reporting import write_results

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "area_lr_scale.json"
EPOCHS, BATCH, LEARNING_RATE = 3, 128, 3e-3
RUNS = [("DFA", "dfa", 1.0), ("SAL-16", "sal", 1.0), ("SAL-16", "sal", 0.25),
        ("SAL-16", "sal", 0.125), ("SAL-16", "sal", 0.0625)]


def parameter_groups(model, scale: float) -> list[dict]:
    areas = {id(p) for m in model.modules() if isinstance(m, AreaLinear) and m.num_areas > 1
             for n, p in m.named_parameters() if not n.startswith("shared.")}
    return [
        {"params": [p for p in model.parameters() if id(p) not in areas], "lr": LEARNING_RATE},
        {"params": [p for p in model.parameters() if id(p) in areas], "lr": LEARNING_RATE * scale},
    ]


def train(method: str, scale: float, data: dict) -> float:
    torch.manual_seed(0)
    config = MLPClassifierConfig(hidden_size=256, num_layers=2, num_labels=10)
    model = convert_to_sal(MLPForImageClassification(config), SALConfig(method=method))
    groups = [g for g in parameter_groups(model, scale) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    inputs, labels = data["train"]["pixel_values"], data["train"]["labels"]
    steps = EPOCHS * math.ceil(len(inputs) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, [g["lr"] for g in groups], total_steps=steps, pct_start=0.02
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(inputs), generator=generator).split(BATCH):
            output = model(pixel_values=inputs[batch], labels=labels[batch])
            router_loss = model.sal_controller.router_loss()
            loss = output.loss if router_loss is None else output.loss + router_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=data["test"]["pixel_values"]).logits
    return float((logits.argmax(-1) == data["test"]["labels"]).float().mean())


def main() -> None:
    splits = load_image_dataset("mnist")
    data = {name: splits[name][:] for name in ("train", "test")}
    rows = []
    for label, method, scale in RUNS:
        started = time.time()
        accuracy = train(method, scale, data)
        rows.append({"run": label, "method": method, "area_learning_rate_scale": scale,
                     "test_accuracy": accuracy, "seconds": round(time.time() - started, 1)})
        print(rows[-1], flush=True)
    command = "python benchmarks/area_lr_scale.py"
    write_results(RESULTS_FILE,
                  {"command": command, "epochs": EPOCHS, "batch_size": BATCH,
                   "learning_rate": LEARNING_RATE, "seed": 0, "runs": rows})
    table = ["| run | area lr scale | test accuracy |", "|---|---|---|"]
    table += [f"| {r['run']} | {r['area_learning_rate_scale']:g} | "
              f"{100 * r['test_accuracy']:.2f}% |" for r in rows]
    replace_section("area_lr_scale", "\n".join(table), command)


if __name__ == "__main__":
    main()
