"""Throw-away tries behind docs/method.md (Deep networks): one epoch of DFA/SAL on MNIST.

    python benchmarks/tries/deep_layers.py "run('dfa', 8)"                 # plain ReLU
    python benchmarks/tries/deep_layers.py "run('dfa', 32, act='tanh')"
    python benchmarks/tries/deep_layers.py "run('dfa', 32, ln=True)"      # LayerNorm in each layer
    python benchmarks/tries/deep_layers.py "run('dfa', 128, res=True)"    # residual form

The argument is Python calling `run`; kept as it was run, not polished.
"""
# ruff: noqa
import sys, time, torch, numpy as np, math
from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal
from sal_hf.data.vision import _read_mnist
torch.set_num_threads(1)
d=_read_mnist(0)
X=torch.tensor(d['train'][0]).reshape(-1,784); Y=torch.tensor(d['train'][1])
Xt=torch.tensor(d['test'][0]).reshape(-1,784); Yt=torch.tensor(d['test'][1])
def run(method, L, act="relu", ln=False, res=False, finalln=False, shared_fb=False, areascale=0.25, shared=False, lr=3e-3, epochs=1, K=None, fbscale=1.0, n=50000, bs=128):
    torch.manual_seed(0)
    m=MLPForImageClassification(MLPClassifierConfig(hidden_size=256,num_layers=L,num_labels=10,hidden_act=act, residual=res))
    if ln:
        for l in m.layers: l.act=torch.nn.Sequential(torch.nn.LayerNorm(256, elementwise_affine=False), l.act)
    m=convert_to_sal(m, SALConfig(method=method, num_areas=K, feedback_scale=fbscale, shared_path=shared)).train()
    if shared_fb:
        fb=m.sal_controller.feedback
        for i in range(2, L): fb.region_i = None; setattr(fb, f"region_{i}", getattr(fb, "region_1"))
    area=[p for n,p in m.named_parameters() if p.dim()>=2 and p.shape[0]==(K or 16) and 'dense' in n and 'shared' not in n and method=='sal'] + [p for n,p in m.named_parameters() if n.endswith('dense.bias') and method=='sal']
    ids={id(p) for p in area}; other=[p for p in m.parameters() if id(p) not in ids]
    groups=[{'params':other,'lr':lr}] + ([{'params':area,'lr':lr*areascale}] if area else [])
    opt=torch.optim.AdamW(groups, lr, weight_decay=0, fused=True)
    steps=epochs*(n//bs); s=0; t=time.time()
    sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5*(1+math.cos(math.pi*min(i,steps)/steps)))
    for ep in range(epochs):
        perm=torch.randperm(n)
        for i in range(n//bs):
            idx=perm[i*bs:(i+1)*bs]
            out=m(pixel_values=X[idx], labels=Y[idx]); loss=out.loss
            rl=m.sal_controller.router_loss()
            if rl is not None: loss=loss+rl
            loss.backward(); opt.step(); opt.zero_grad(); sched.step()
            if not torch.isfinite(loss): print("nonfinite"); return
    m.eval()
    with torch.no_grad():
        acc=(m(pixel_values=Xt).logits.argmax(-1)==Yt).float().mean().item()
        h=Xt[:512]; norms=[]
        for l in m.layers: h=l(h); norms.append(h.norm(dim=1).mean().item())
    print(method,L,"bs",bs,"shared" if shared else "", act,"sharedfb" if shared_fb else "","ln" if ln else "", "res" if res else "",lr,epochs,K,fbscale, "acc %.4f"%acc, "t %.0fs"%(time.time()-t), "norms", [round(norms[i],1) for i in (0,len(norms)//2,-1)], flush=True)
exec(sys.argv[1])
