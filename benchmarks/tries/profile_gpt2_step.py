"""Throw-away try behind docs/method.md (Cost of a step): torch profiler tables of 4 training
steps of BP and of SAL-4 (token routing) on the benchmark's GPT-2 (6 layers, d_model 256,
vocabulary 8,192, 1,024 tokens a step, fused AdamW, 1 thread), after 3 warm-up steps.

    python benchmarks/tries/profile_gpt2_step.py

Kept as it was run, not polished; the set-up it shares with the other GPT-2 tries is in
gpt2_step.py.
"""
# ruff: noqa
from torch.profiler import profile, ProfilerActivity
from gpt2_step import build, step
from sal_hf import SALConfig
for name, cfg in [("bp", SALConfig(method="bp")), ("sal", SALConfig(num_areas=4, routing="token"))]:
    m, o = build(cfg)
    for _ in range(3): step(m, o)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(4): step(m, o)
    print("=====", name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
