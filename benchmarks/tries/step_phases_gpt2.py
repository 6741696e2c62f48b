"""Throw-away try behind docs/results.md (GPT-2 throughput, where SAL's time goes): forward,
backward and fused-AdamW time of BP, DFA, SAL-2 and SAL-4 (token routing) and SAL-4 with sample
routing on the benchmark's GPT-2 (6 layers, d_model 256, vocabulary 8,192, 1,024 tokens a step,
1 thread), median over interleaved rounds, the first 3 left out.

    python benchmarks/tries/step_phases_gpt2.py [rounds]

Kept as it was run, not polished; the set-up it shares with the other GPT-2 tries is in
gpt2_step.py.
"""
# ruff: noqa
import sys, time, statistics
from gpt2_step import build, tokens
from sal_hf import SALConfig
variants = {"bp": SALConfig(method="bp"), "sal4": SALConfig(num_areas=4, routing="token"),
            "sal2": SALConfig(num_areas=2, routing="token"),
            "sal4-sample": SALConfig(num_areas=4, routing="sample"), "dfa": SALConfig(method="dfa")}
built = {k: build(v) for k, v in variants.items()}
T = {k: {"forward": [], "backward": [], "optimizer": []} for k in built}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 16):
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
for k, d in T.items():
    total = sum(statistics.median(v) for v in d.values())
    print(k, {p: round(statistics.median(v) * 1000, 1) for p, v in d.items()},
          "total ms", round(total * 1000, 1), "BP/this", round(bp_total / total, 3))
