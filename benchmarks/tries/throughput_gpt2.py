"""Throw-away try behind docs/method.md (Cost of a step): GPT-2 training tokens/s of BP, DFA and
SAL-4 (token and sample routing), the benchmark's model (6 layers, d_model 256, vocabulary
8,192), 1,024 tokens a step, fused AdamW, 1 thread, median of 18 interleaved steps.

    python benchmarks/tries/throughput_gpt2.py [steps]

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
variants = {"bp": SALConfig(method="bp"), "dfa": SALConfig(method="dfa"),
            "sal-token": SALConfig(num_areas=4, routing="token"), "sal-sample": SALConfig(num_areas=4, routing="sample")}
ms={k: mk(v) for k,v in variants.items()}
ts={k:[] for k in ms}
N=int(sys.argv[1]) if len(sys.argv)>1 else 20
for i in range(N):
    for k,(m,o) in ms.items():
        t=time.perf_counter(); step(m,o); ts[k].append(time.perf_counter()-t)
med={k: sorted(v[2:])[len(v[2:])//2] for k,v in ts.items()}
print("seconds per step", {k: round(v,3) for k,v in med.items()})
print("tokens/s / BP's", {k: round(med['bp']/v,3) for k,v in med.items()})
