"""Throw-away try behind docs/results.md (GPT-2 throughput, where SAL's time goes): forward,
backward and fused-AdamW time of BP, DFA, SAL-2 and SAL-4 (token routing) and SAL-4 with sample
routing on the benchmark's GPT-2 (6 layers, d_model 256, vocabulary 8,192, 1,024 tokens a step,
1 thread), median over interleaved rounds, the first 3 left out.

    python benchmarks/tries/step_phases_gpt2.py [rounds]

Kept as it was run, not polished; the set-up and timing it shares with the other GPT-2 tries
are in gpt2_step.py.
"""
# ruff: noqa
import sys
from gpt2_step import phase_medians, print_phases
from sal_hf import SALConfig
variants = {"bp": SALConfig(method="bp"), "sal4": SALConfig(num_areas=4, routing="token"),
            "sal2": SALConfig(num_areas=2, routing="token"),
            "sal4-sample": SALConfig(num_areas=4, routing="sample"),
            "dfa": SALConfig(method="dfa")}
print_phases(phase_medians(variants, int(sys.argv[1]) if len(sys.argv) > 1 else 16))
