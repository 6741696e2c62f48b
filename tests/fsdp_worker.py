"""SAL under PyTorch FSDP2 on CPU processes, started by `tests/test_fsdp.py` with torchrun.

Accelerate 1.16 runs FSDP only on GPU-type processes (accelerate_configs/fsdp.yaml), so this
worker shards the model itself over a gloo process group: `fully_shard` on every region that
has parameters, then on the root (routers and head). A plain loop trains it: forward, the
routers' local loss added to the task loss, one `backward()`, an AdamW step. Each rank takes its
consecutive share of the same global batch of real data.

The cases run one after another in one process group, since starting the processes costs more
than training; after each, rank 0 writes `<output_dir>/<case>.json`:

- `mlp`: a SAL MLP on MNIST. `steps` (per step, the mean over ranks of the loss and the task
  loss), `ranks` (per rank: which modules are FSDP units, how each parameter is sharded, the
  routers' running means). The full state, gathered after training, is saved with
  `save_pretrained` in `<output_dir>/mlp_saved` and, by safetensors directly, in
  `<output_dir>/mlp_gathered.safetensors`.
- `mlp_forced`: the same, with each rank routing only to the half of the areas that the other
  rank holds: `steps`, `ranks` (the areas each rank's routers chose), `changed_areas` (per area
  layer, whether each area's weights moved).
- `gpt2`: a tiny SAL GPT-2 with per-token routing on King James Bible bytes: `steps`, `ranks`
  (as for `mlp`, without the running means).

The test computes the one-process references with the same set-ups (`single_process`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2LMHeadModel

from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal
from sal_hf.areas import AreaLinear
from sal_hf.data import load_corpus, load_image_dataset
from sal_hf.regions import get_controller
from sal_hf.routing import Router

__all__ = ["SETUPS", "single_process", "train"]

logger = logging.getLogger(__name__)

STEPS = 6
GLOBAL_BATCH = 32  # MNIST rows per step
TEXT_STEPS = 4
TEXT_BATCH = 8  # sequences per step
TEXT_BLOCK = 32  # bytes per sequence
# A collective that waits longer than this raises on every rank instead of hanging.
COLLECTIVE_TIMEOUT_S = 60

Batch = dict[str, torch.Tensor]


def mlp_model() -> MLPForImageClassification:
    """The same freshly initialised SAL MLP (784-64-64-10, 4 areas) on every call."""
    torch.manual_seed(0)
    config = MLPClassifierConfig(input_size=784, hidden_size=64, num_layers=2, num_labels=10)
    return convert_to_sal(MLPForImageClassification(config), SALConfig(num_areas=4, routing_dim=8))


def gpt2_model() -> GPT2LMHeadModel:
    """A 2-block GPT-2 over bytes (vocabulary 256), 4 areas per MLP, one area per token.

    Dropout is off so that the ranks and the reference compute the same function.
    """
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=TEXT_BLOCK, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    sal_config = SALConfig(num_areas=4, routing="token", routing_dim=8)
    return convert_to_sal(GPT2LMHeadModel(config), sal_config)


def mnist_batches(steps: int = STEPS, batch: int = GLOBAL_BATCH) -> list[Batch]:
    """The first `steps * batch` MNIST training rows, in order, as global batches."""
    rows = load_image_dataset("mnist", limit=steps * batch)["train"][:]
    return [
        {key: rows[key][step * batch:(step + 1) * batch] for key in ("pixel_values", "labels")}
        for step in range(steps)
    ]


def text_batches(steps: int = TEXT_STEPS, batch: int = TEXT_BATCH) -> list[Batch]:
    """Consecutive byte blocks of the King James Bible, `[batch, TEXT_BLOCK]` per step."""
    data = load_corpus("kjv").encode()[: steps * batch * TEXT_BLOCK]
    ids = torch.tensor(list(data), dtype=torch.long).view(steps, batch, TEXT_BLOCK)
    return [{"input_ids": block, "labels": block} for block in ids]


@dataclass(frozen=True)
class Setup:
    """What a case trains: its model, its global batches and the learning rate."""

    model: Callable[[], nn.Module]
    batches: Callable[[], list[Batch]]
    learning_rate: float


# GPT-2 at 1e-2, where its loss visibly falls within the few steps (at 1e-3 it barely moves).
SETUPS = {
    "mlp": Setup(mlp_model, mnist_batches, 1e-3),
    "gpt2": Setup(gpt2_model, text_batches, 1e-2),
}


def shard(model: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2: one unit per region with parameters, then the root (routers, head, the rest)."""
    for region in get_controller(model).regions:
        if next(region.module.parameters(), None) is not None:
            fully_shard(region.module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _mean_over_ranks(values: torch.Tensor, world: int) -> list[float]:
    values = values.detach().double()
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values.tolist()


def train(
    model: nn.Module, batches: list[Batch], learning_rate: float, rank: int = 0, world: int = 1
) -> list[dict[str, float]]:
    """Train on `batches`, rank `rank` of `world` taking its share of each; per step, the mean
    over ranks of the loss (task + router) and of the task loss."""
    # No weight decay: with it every area moves every step, whether it had a gradient or not.
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    controller = get_controller(model)
    model.train()
    steps = []
    for batch in batches:
        local = {key: value.chunk(world)[rank] for key, value in batch.items()}
        task_loss = model(**local).loss
        loss = task_loss + controller.router_loss()
        loss.backward()  # the whole SAL update: head gradient, feedback to every region
        optimizer.step()
        optimizer.zero_grad()
        mean_loss, mean_task = _mean_over_ranks(torch.stack([loss, task_loss]), world)
        steps.append({"loss": mean_loss, "task_loss": mean_task})
    return steps


def single_process(case: str) -> list[dict[str, float]]:
    """The reference: `case`'s set-up trained in this process, unsharded, on whole batches."""
    setup = SETUPS[case]
    return train(setup.model(), setup.batches(), setup.learning_rate)


def sharding(model: nn.Module) -> dict[str, Any]:
    """Which modules are FSDP units, and how this rank holds each parameter."""
    parameters = {}
    for name, parameter in model.named_parameters():
        is_dtensor = isinstance(parameter, DTensor)
        parameters[name] = {
            "dtensor": is_dtensor,
            "placements": [repr(p) for p in parameter.placements] if is_dtensor else None,
            "mesh_size": parameter.device_mesh.size() if is_dtensor else None,
            "shape": list(parameter.shape),
            "local_shape": list(parameter.to_local().shape if is_dtensor else parameter.shape),
        }
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    return {"units": units, "parameters": parameters}


def running_means(model: nn.Module) -> dict[str, list[float]]:
    return {
        name: module.running_mean.tolist()
        for name, module in model.named_modules() if isinstance(module, Router)
    }


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, unsharded, on rank 0 (a collective; the other
    ranks get an empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def force_rank_areas(model: nn.Module, rank: int, world: int) -> dict[str, set[int]]:
    """Make rank r route only to the (r+1)-th block (cyclically) of `num_areas / world` areas;
    returns, per router, the set of areas this rank will have chosen.

    FSDP gives rank r the r-th block of every area weight, so each area's gradient then exists
    only on a rank that does not hold the area: it reaches its owner by the reduce-scatter alone.
    """
    used: dict[str, set[int]] = {}
    for name, router in model.named_modules():
        if not isinstance(router, Router):
            continue
        block = router.num_areas // world
        first = (rank + 1) % world * block
        used[name] = set()

        def hook(module, args, areas, name=name, block=block, first=first):
            areas = areas % block + first
            used[name].update(areas.unique().tolist())
            return areas

        router.register_forward_hook(hook)
    return used


@dataclass
class Context:
    """Where a case runs: this process's rank, the number of ranks, their mesh, the reports."""

    rank: int
    world: int
    mesh: DeviceMesh
    output_dir: Path


def train_sharded(
    case: str, context: Context, prepare: Callable[[nn.Module], Any] | None = None
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Build `case`'s model, let `prepare` see it whole, shard it, train it on this rank's
    share of every batch."""
    setup = SETUPS[case]
    model = setup.model()
    if prepare is not None:
        prepare(model)
    shard(model, context.mesh)
    steps = train(model, setup.batches(), setup.learning_rate, context.rank, context.world)
    return model, steps


def run_mlp(context: Context) -> dict[str, Any]:
    model, steps = train_sharded("mlp", context)
    rank_report = {"rank": context.rank, **sharding(model), "running_means": running_means(model)}
    state = full_state(model)
    if context.rank == 0:
        save_file(state, context.output_dir / "mlp_gathered.safetensors", metadata={"format": "pt"})
        model.save_pretrained(context.output_dir / "mlp_saved", state_dict=state)
    return {"steps": steps, "ranks": _gather(rank_report)}


def run_mlp_forced(context: Context) -> dict[str, Any]:
    initial: dict[str, torch.Tensor] = {}
    used: dict[str, set[int]] = {}

    def prepare(model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, AreaLinear):
                initial[name] = module.weight.detach().clone()
        used.update(force_rank_areas(model, context.rank, context.world))

    model, steps = train_sharded("mlp", context, prepare)
    state = full_state(model)
    changed = {
        name: [not torch.equal(before[k], state[f"{name}.weight"][k]) for k in range(len(before))]
        for name, before in initial.items()
    } if context.rank == 0 else {}
    areas = {name: sorted(chosen) for name, chosen in used.items()}
    return {
        "steps": steps,
        "ranks": _gather({"rank": context.rank, "areas_used": areas}),
        "changed_areas": changed,
    }


def run_gpt2(context: Context) -> dict[str, Any]:
    model, steps = train_sharded("gpt2", context)
    return {"steps": steps, "ranks": _gather({"rank": context.rank, **sharding(model)})}


CASES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "mlp": run_mlp, "mlp_forced": run_mlp_forced, "gpt2": run_gpt2,
}


def _gather(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    context = Context(rank, world, init_device_mesh("cpu", (world,)), args.output_dir)
    for case in args.cases:
        report = CASES[case](context)
        if rank == 0:
            (args.output_dir / f"{case}.json").write_text(json.dumps(report, indent=1))
            logger.info("Wrote the report of case %s.", case)
    # Exit together: a rank that leaves while another still talks to it aborts.
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads may still hold tensors then, and
    # freeing them aborts the process (https://github.com/pytorch/pytorch/pull/179291).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
