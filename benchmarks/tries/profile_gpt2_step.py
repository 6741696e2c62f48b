"""Throw-away try behind docs/method.md (Cost of a step): torch profiler tables of 4 training
steps of BP and of SAL-4 (token routing) on the benchmark's GPT-2 (6 layers, d_model 256,
vocabulary 8,192, 1,024 tokens a step, fused AdamW, 1 thread), after 3 warm-up steps.

    python benchmarks/tries/profile_gpt2_step.py

Kept as it was run, not polished.
"""
# ruff: noqa
import torch, time
from transformers import GPT2Config, GPT2LMHeadModel
from sal_hf import SALConfig, convert_to_sal
torch.set_num_threads(1); torch.manual_seed(0)
tokens = torch.randint(0, 8192, (8, 128))
def mk(cfg):
    config = GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=6, n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = convert_to_sal(GPT2LMHeadModel(config), cfg).train()
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
def step(m, o):
    loss = m(input_ids=tokens, labels=tokens).loss
    rl = m.sal_controller.router_loss()
    (loss if rl is None else loss+rl).backward(); o.step(); o.zero_grad(set_to_none=True)
from torch.profiler import profile, ProfilerActivity
for name, cfg in [("bp", SALConfig(method="bp")), ("sal", SALConfig(num_areas=4, routing="token"))]:
    m,o = mk(cfg)
    for _ in range(3): step(m,o)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(4): step(m,o)
    print("=====", name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
