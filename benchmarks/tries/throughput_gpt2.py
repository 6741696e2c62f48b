"""Throw-away try behind docs/method.md (Cost of a step): GPT-2 tokens/s of BP, SAL-4 (token
and sample routing) and DFA, 10 interleaved steps in one process, 1 thread.

    python benchmarks/tries/throughput_gpt2.py

Kept as it was run, not polished.
"""
# ruff: noqa
import sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from sal_hf import SALConfig, convert_to_sal
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
cfgs = {"bp": SALConfig(method="bp"), "sal-token": SALConfig(method="sal", num_areas=4, routing="token"), "sal-sample": SALConfig(method="sal", num_areas=4, routing="sample"), "dfa": SALConfig(method="dfa")}
ms={k: mk(v) for k,v in cfgs.items()}
ts={k:[] for k in ms}
for i in range(12):
    for k,(m,o) in ms.items():
        t=time.perf_counter(); step(m,o); ts[k].append(time.perf_counter()-t)
med={k: sorted(v[2:])[5] for k,v in ts.items()}
print({k: round(v,3) for k,v in med.items()}, {k: round(med['bp']/v,3) for k,v in med.items()})
