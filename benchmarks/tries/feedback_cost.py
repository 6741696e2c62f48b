"""Throw-away try behind the closing note of issue 3: does the compressed feedback's size set the
cost of SAL's GPT-2 step? BP against SAL-4 (token routing) with feedback rank 256 in 8 or 32
blocks, and rank 64 in 8 blocks; the benchmark's model, 1,024 tokens a step, fused AdamW, one
thread, median of interleaved steps after 3 warm-up rounds.

    python benchmarks/tries/feedback_cost.py [steps]

Kept as it was run, not polished.
"""
# ruff: noqa
import sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from sal_hf import SALConfig, convert_to_sal
torch.set_num_threads(1); torch.manual_seed(0)
tokens = torch.randint(0, 8192, (8, 128))
def mk(cfg):
    config = GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=6, n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    m = convert_to_sal(GPT2LMHeadModel(config), cfg).train()
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
def step(m, o):
    loss = m(input_ids=tokens, labels=tokens).loss
    rl = m.sal_controller.router_loss()
    (loss if rl is None else loss+rl).backward(); o.step(); o.zero_grad(set_to_none=True)
variants = {"bp": SALConfig(method="bp"), "b8": SALConfig(num_areas=4, routing="token", feedback_rank=256, feedback_blocks=8),
            "b32": SALConfig(num_areas=4, routing="token", feedback_rank=256, feedback_blocks=32),
            "b8r64": SALConfig(num_areas=4, routing="token", feedback_rank=64, feedback_blocks=8)}
ms={k: mk(v) for k,v in variants.items()}
ts={k:[] for k in ms}
N=int(sys.argv[1]) if len(sys.argv)>1 else 30
for i in range(N):
    for k,(m,o) in ms.items():
        t=time.perf_counter(); step(m,o); ts[k].append(time.perf_counter()-t)
med={k: sorted(v[3:])[len(v[3:])//2] for k,v in ts.items()}
print("seconds per step", {k: round(v,4) for k,v in med.items()})
print("tokens/s / BP's", {k: round(med['bp']/v,3) for k,v in med.items()})
