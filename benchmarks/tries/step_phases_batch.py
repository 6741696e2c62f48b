"""Throw-away try behind docs/results.md (GPT-2 throughput against tokens per step): forward,
backward and fused-AdamW time of BP, DFA and SAL-4 (token routing) on the benchmark's GPT-2 at
a given batch of 128-token sequences, 1 thread, median over interleaved rounds, the first 3 left
out. SAL's extra optimizer work is per step, its saving (no `e @ W_head`) per token.

    python benchmarks/tries/step_phases_batch.py BATCH [rounds]

Kept as it was run, not polished; the timing it shares with the other GPT-2 tries is in
gpt2_step.py.
"""
# ruff: noqa
import sys, torch
from gpt2_step import phase_medians, print_phases
from sal_hf import SALConfig
batch = int(sys.argv[1]); rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 12
tokens = torch.randint(0, 8192, (batch, 128))
variants = {"bp": SALConfig(method="bp"), "sal4": SALConfig(num_areas=4, routing="token"),
            "dfa": SALConfig(method="dfa")}
print("tokens per step", batch * 128)
print_phases(phase_medians(variants, rounds, batch=tokens))
