"""Throw-away try behind docs/method.md (Cost of a step): op-by-op profile of GPT-2, DFA vs BP.

    python benchmarks/tries/profile_gpt2.py

Kept as it was run, not polished; the set-up it shares with the other GPT-2 tries is in
gpt2_step.py.
"""
# ruff: noqa
from torch.profiler import profile
from gpt2_step import build, step
from sal_hf import SALConfig
res={}
for name,cfg in {"bp": SALConfig(method="bp"), "sal": SALConfig(method="dfa")}.items():
    m,o=build(cfg)
    for i in range(3): step(m,o)
    with profile() as p:
        for i in range(4): step(m,o)
    res[name]={e.key:(e.self_cpu_time_total/4/1000, e.count/4) for e in p.key_averages()}
keys=set(res['bp'])|set(res['sal'])
rows=sorted(keys, key=lambda k: -abs(res['sal'].get(k,(0,0))[0]-res['bp'].get(k,(0,0))[0]))
tot={n: sum(v[0] for v in r.values()) for n,r in res.items()}
print("total ms/step", tot)
for k in rows[:25]:
    bp, sal = res['bp'].get(k, (0, 0)), res['sal'].get(k, (0, 0))
    print(f"{k[:60]:60s} bp {bp[0]:8.1f}ms x{bp[1]:5.0f}  sal {sal[0]:8.1f}ms x{sal[1]:5.0f}")
