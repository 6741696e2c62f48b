"""Throw-away try behind docs/method.md (Cost of a step): GPT-2 training tokens/s of BP, DFA and
SAL-4 (token and sample routing), the benchmark's model (6 layers, d_model 256, vocabulary
8,192), 1,024 tokens a step, fused AdamW, 1 thread, median of 18 interleaved steps.

    python benchmarks/tries/throughput_gpt2.py [steps]

Kept as it was run, not polished; the set-up it shares with the other GPT-2 tries is in
gpt2_step.py.
"""
# ruff: noqa
import sys
from gpt2_step import interleaved_medians
from sal_hf import SALConfig
variants = {"bp": SALConfig(method="bp"), "dfa": SALConfig(method="dfa"),
            "sal-token": SALConfig(num_areas=4, routing="token"),
            "sal-sample": SALConfig(num_areas=4, routing="sample")}
med = interleaved_medians(variants, rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 20, warmup=2)
print("seconds per step", {k: round(v, 3) for k, v in med.items()})
print("tokens/s / BP's", {k: round(med['bp'] / v, 3) for k, v in med.items()})
