"""Throw-away try: the area matmul written inline the old way (unbind + stack) against
AreaLinear (one autograd function), forward + backward, 1 thread, median of 30.

    python benchmarks/tries/area_matmul.py

Kept as it was run, not polished.
"""
# ruff: noqa
import time, torch
from sal_hf.areas import AreaLinear, _GroupedLinear
torch.set_num_threads(1)
def old(layer, flat, areas):
    order = torch.argsort(areas, stable=True)
    sizes = torch.bincount(areas, minlength=layer.num_areas).tolist()
    groups = flat.index_select(0, order).split(sizes)
    pieces=[torch.addmm(b, g, w.T) for g,w,b in zip(groups, layer.weight.unbind(0), layer.bias.unbind(0)) if g.shape[0]]
    inverse = torch.empty_like(order); inverse[order]=torch.arange(order.numel())
    return torch.cat(pieces).index_select(0, inverse)
for (i,o,K,N) in [(784,256,16,128),(256,1024,4,1024),(1024,256,4,1024)]:
    layer=AreaLinear(i,o,K); x=torch.randn(N,i,requires_grad=True); a=torch.randint(0,K,(N,))
    t={'old':[], 'new':[]}
    for r in range(30):
        for name in t:
            s=time.perf_counter()
            y = old(layer,x,a) if name=='old' else layer(x,a)
            y.sum().backward(); layer.weight.grad=None; layer.bias.grad=None; x.grad=None
            t[name].append(time.perf_counter()-s)
    print(i,o,K,N, {k: round(sorted(v)[15]*1000,2) for k,v in t.items()})
    y1=old(layer,x,a); y2=layer(x,a); print(' max diff', (y1-y2).abs().max().item())
