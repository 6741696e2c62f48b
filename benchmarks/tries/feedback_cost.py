"""Throw-away try behind the closing note of issue 3: does the compressed feedback's size set the
cost of SAL's GPT-2 step? BP against SAL-4 (token routing) with feedback rank 256 in 8 or 32
blocks, and rank 64 in 8 blocks; the benchmark's model, 1,024 tokens a step, fused AdamW, one
thread, median of interleaved steps after 3 warm-up rounds.

    python benchmarks/tries/feedback_cost.py [steps]

Kept as it was run, not polished; the set-up it shares with the other GPT-2 tries is in
gpt2_step.py.
"""
# ruff: noqa
import sys
from gpt2_step import interleaved_medians
from sal_hf import SALConfig
sal = dict(num_areas=4, routing="token")
variants = {"bp": SALConfig(method="bp"),
            "b8": SALConfig(**sal, feedback_rank=256, feedback_blocks=8),
            "b32": SALConfig(**sal, feedback_rank=256, feedback_blocks=32),
            "b8r64": SALConfig(**sal, feedback_rank=64, feedback_blocks=8)}
med = interleaved_medians(variants, rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 30, warmup=3)
print("seconds per step", {k: round(v, 4) for k, v in med.items()})
print("tokens/s / BP's", {k: round(med['bp'] / v, 3) for k, v in med.items()})
