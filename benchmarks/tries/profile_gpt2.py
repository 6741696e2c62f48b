"""Throw-away try behind docs/method.md (Cost of a step): op-by-op profile of GPT-2, DFA vs BP.

    python benchmarks/tries/profile_gpt2.py

Kept as it was run, not polished.
"""
# ruff: noqa
import sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from sal_hf import SALConfig, convert_to_sal
from torch.profiler import profile
torch.set_num_threads(1)
torch.manual_seed(0)
tokens = torch.randint(0, 8192, (8, 128))
def mk(cfg):
    config = GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=6, n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    m = convert_to_sal(GPT2LMHeadModel(config), cfg).train()
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
def step(m, o):
    loss = m(input_ids=tokens, labels=tokens).loss
    rl = m.sal_controller.router_loss()
    (loss if rl is None else loss+rl).backward(); o.step(); o.zero_grad(set_to_none=True)
res={}
for name,cfg in {"bp": SALConfig(method="bp"), "sal": SALConfig(method="dfa")}.items():
    m,o=mk(cfg)
    for i in range(3): step(m,o)
    with profile() as p:
        for i in range(4): step(m,o)
    res[name]={e.key:(e.self_cpu_time_total/4/1000, e.count/4) for e in p.key_averages()}
keys=set(res['bp'])|set(res['sal'])
rows=sorted(keys, key=lambda k: -abs(res['sal'].get(k,(0,0))[0]-res['bp'].get(k,(0,0))[0]))
tot={n: sum(v[0] for v in r.values()) for n,r in res.items()}
print("total ms/step", tot)
for k in rows[:25]:
    print(f"{k[:60]:60s} bp {res['bp'].get(k,(0,0))[0]:8.1f}ms x{res['bp'].get(k,(0,0))[1]:5.0f}  sal {res['sal'].get(k,(0,0))[0]:8.1f}ms x{res['sal'].get(k,(0,0))[1]:5.0f}")
