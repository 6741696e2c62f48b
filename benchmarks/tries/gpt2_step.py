"""What the GPT-2 tries share: the benchmark's model (6 layers, d_model 256, vocabulary 8,192),
one batch of 8 x 128 tokens, a training step (forward, the router loss, one backward, fused AdamW)
and interleaved timing. One thread; seeded, so every try sees the same batch and weights."""
# ruff: noqa
import statistics, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from sal_hf import convert_to_sal
torch.set_num_threads(1)
torch.manual_seed(0)
tokens = torch.randint(0, 8192, (8, 128))


def build(sal_config):
    config = GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=6, n_head=8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = convert_to_sal(GPT2LMHeadModel(config), sal_config).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)


def step(model, optimizer):
    loss = model(input_ids=tokens, labels=tokens).loss
    router_loss = model.sal_controller.router_loss()
    (loss if router_loss is None else loss + router_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def interleaved_medians(variants, rounds, warmup):
    """Median seconds per step of each variant, their steps taken in turn, `warmup` rounds
    left out."""
    built = {name: build(config) for name, config in variants.items()}
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, (model, optimizer) in built.items():
            started = time.perf_counter()
            step(model, optimizer)
            times[name].append(time.perf_counter() - started)
    return {name: sorted(t[warmup:])[len(t[warmup:]) // 2] for name, t in times.items()}


def phase_medians(variants, rounds, batch=tokens, warmup=3):
    """Median seconds of each variant's forward (with the router loss), backward and
    optimizer step (with zero_grad), their steps taken in turn on `batch`, `warmup` rounds
    left out."""
    built = {name: build(config) for name, config in variants.items()}
    times = {name: {"forward": [], "backward": [], "optimizer": []} for name in built}
    for index in range(rounds):
        for name, (model, optimizer) in built.items():
            t0 = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            router_loss = model.sal_controller.router_loss()
            if router_loss is not None:
                loss = loss + router_loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if index >= warmup:
                for phase, seconds in zip(times[name], (t1 - t0, t2 - t1, t3 - t2)):
                    times[name][phase].append(seconds)
    return {name: {phase: statistics.median(t) for phase, t in phases.items()}
            for name, phases in times.items()}


def print_phases(medians):
    """One line per variant: each phase in ms, the step, and BP's step over it."""
    bp_total = sum(medians["bp"].values())
    for name, phases in medians.items():
        total = sum(phases.values())
        print(name, {phase: round(seconds * 1000, 1) for phase, seconds in phases.items()},
              "total ms", round(total * 1000, 1), "BP/this", round(bp_total / total, 3))
