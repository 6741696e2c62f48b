"""Throw-away try behind docs/results.md (GPT-2 throughput against tokens per step): forward,
backward and fused-AdamW time of BP, DFA and SAL-4 (token routing) on the benchmark's GPT-2 at
a given batch of 128-token sequences, 1 thread, median over interleaved rounds, the first 3 left
out. SAL's extra optimizer work is per step, its saving (no `e @ W_head`) per token.

    python benchmarks/tries/step_phases_batch.py BATCH [rounds]

Kept as it was run, not polished.
"""
# ruff: noqa
import sys, time, statistics, torch
import gpt2_step
from gpt2_step import build
from sal_hf import SALConfig
batch = int(sys.argv[1]); rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 12
tokens = torch.randint(0, 8192, (batch, 128))
variants = {"bp": SALConfig(method="bp"), "sal4": SALConfig(num_areas=4, routing="token"),
            "dfa": SALConfig(method="dfa")}
built = {k: build(v) for k, v in variants.items()}
T = {k: {"forward": [], "backward": [], "optimizer": []} for k in built}
for r in range(rounds):
    for k, (m, o) in built.items():
        t0 = time.perf_counter()
        loss = m(input_ids=tokens, labels=tokens).loss
        rl = m.sal_controller.router_loss()
        if rl is not None: loss = loss + rl
        t1 = time.perf_counter(); loss.backward(); t2 = time.perf_counter()
        o.step(); o.zero_grad(set_to_none=True); t3 = time.perf_counter()
        if r >= 3:
            T[k]["forward"].append(t1 - t0); T[k]["backward"].append(t2 - t1); T[k]["optimizer"].append(t3 - t2)
bp_total = sum(statistics.median(v) for v in T["bp"].values())
print("tokens per step", batch * 128)
for k, d in T.items():
    total = sum(statistics.median(v) for v in d.values())
    print(k, {p: round(statistics.median(v) * 1000, 1) for p, v in d.items()},
          "total ms", round(total * 1000, 1), "BP/this", round(bp_total / total, 3))
