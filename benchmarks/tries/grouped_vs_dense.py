"""Throw-away try behind docs/method.md (Cost of a step): forward + backward of one GPT-2-sized
area layer (4 areas, rows already grouped in quarters, as AreaSort hands them over) against a
dense nn.Linear of the same shape, 1,024 rows, 1 thread, mean of 100.

    python benchmarks/tries/grouped_vs_dense.py

Kept as it was run, not polished.
"""
# ruff: noqa
import torch, time
from sal_hf.areas import AreaLinear, _GroupedLinear
torch.set_num_threads(1)
def bench(f,n=100):
  for _ in range(5): f()
  t=time.perf_counter()
  for _ in range(n): f()
  return (time.perf_counter()-t)/n*1000
for (i,o) in [(256,1024),(1024,256)]:
  a=AreaLinear(i,o,4); x=torch.randn(1024,i,requires_grad=True); g=torch.randn(1024,o)
  sizes=(256,256,256,256)
  lin=torch.nn.Linear(i,o)
  def area():
    y=_GroupedLinear.apply(x,a.weight,a.bias,None,sizes); y.backward(g)
    a.weight.grad=None; a.bias.grad=None; x.grad=None
  def dense():
    y=lin(x); y.backward(g); lin.weight.grad=None; lin.bias.grad=None; x.grad=None
  print(i,o,'area ms',bench(area),'dense ms',bench(dense))
