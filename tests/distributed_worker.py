"""A tiny SAL training run that `tests/test_distributed.py` starts with `accelerate launch`.

It trains a small SAL MLP on a few hundred real MNIST rows with `SALTrainer`, under whatever
the accelerate config sets up (one process, DDP, DeepSpeed ZeRO-2 or ZeRO-3), and the main
process writes a JSON report:

- `steps`: per optimizer step, the Trainer's logged `loss` (task + router loss, averaged over
  ranks by the Trainer) and `task_loss`, the mean over ranks of each rank's task loss;
- `distributed`: `sal_hf.reporting.distributed_info(trainer)`, plus what the wrapped model
  really is (`wrapper_class`, and for a DeepSpeed engine its ZeRO stage, micro batch,
  gradient accumulation and bf16 setting as the engine runs them);
- `final_checksum`: sha256 of the gathered final parameters and buffers;
- `ranks`: per rank, the areas its routers chose (per step, and the set over the run), the
  router running means, the samples of each step, and the checksum of the final state as
  that rank gathered it;
- `log_history`: the main process's `trainer.state.log_history`;
- `changed_areas`: per area layer, whether each area's weights moved during the run;
- `group_learning_rates`: the learning rate of each parameter group of the optimizer that steps.

Options force ranks onto disjoint areas (`--force_rank_areas`), save checkpoints
(`--save_steps`), resume (`--resume_from`), accumulate gradients (`--grad_accum`), write the
gathered final state as safetensors (`--save_gathered`), switch the routers' balance term off
(`--balance_loss_weight 0`), log every N steps (`--logging_steps`) and set the area and head
learning-rate multipliers (`--area_learning_rate_scale`, SAL's default when unset, and
`--head_learning_rate_scale`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from transformers import set_seed

from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal
from sal_hf.areas import AreaLinear
from sal_hf.data import load_image_dataset
from sal_hf.reporting import distributed_info
from sal_hf.routing import Router
from sal_hf.trainer import SALTrainer, SALTrainingArguments

__all__ = ["main"]

logger = logging.getLogger(__name__)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="path of the JSON report")
    parser.add_argument("--output_dir", required=True, help="Trainer output_dir (checkpoints)")
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--global_batch", type=int, default=32, help="samples per optimizer step")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--rows", type=int, default=256, help="MNIST training rows used")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_areas", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim")
    parser.add_argument(
        "--area_learning_rate_scale", type=float, default=None, help="unset: SAL's default"
    )
    parser.add_argument("--head_learning_rate_scale", type=float, default=1.0)
    parser.add_argument("--balance_loss_weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logging_steps", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="TrainingArguments.bf16")
    parser.add_argument("--save_steps", type=int, default=0, help="0: save no checkpoint")
    parser.add_argument("--resume_from", default=None, help="checkpoint folder to resume from")
    parser.add_argument("--save_gathered", default=None, help="write the final state here")
    parser.add_argument(
        "--force_rank_areas",
        action="store_true",
        help="rank r may only use the r-th block of num_areas / world_size areas",
    )
    return parser.parse_args()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def build_model(args: argparse.Namespace) -> MLPForImageClassification:
    """The same freshly initialised SAL MLP on every rank (seeded)."""
    set_seed(args.seed)
    config = MLPClassifierConfig(
        input_size=784, hidden_size=args.hidden_size, num_layers=2, num_labels=10
    )
    model = MLPForImageClassification(config)
    sal_config = SALConfig(
        num_areas=args.num_areas, routing_dim=8, balance_loss_weight=args.balance_loss_weight
    )
    return convert_to_sal(model, sal_config)


class RunRecorder:
    """Records, per optimizer step, what this rank routed and which samples it saw.

    With `force`, rank r of W maps every routing choice into the r-th block of
    `num_areas / W` areas, so the ranks use disjoint areas and every area is untouched on all
    ranks but one.
    """

    def __init__(self, model: nn.Module, force: bool) -> None:
        self.trainer: SALTrainer | None = None
        self.usage: dict[str, dict[int, list[int]]] = {}
        self.samples: dict[int, list[list[float]]] = {}
        self.routers = {n: m for n, m in model.named_modules() if isinstance(m, Router)}
        world, rank = _world_size(), _rank()
        for name, router in self.routers.items():
            if force and router.num_areas % world:
                raise ValueError(
                    f"--force_rank_areas needs num_areas divisible by the world size; got "
                    f"num_areas={router.num_areas} and {world} processes."
                )
            block = router.num_areas // world
            self.usage[name] = {}
            router.register_forward_hook(self._router_hook(name, block, rank, force))
        model.register_forward_pre_hook(self._batch_hook, with_kwargs=True)

    def _step(self) -> int | None:
        """The optimizer step being computed, or None outside training."""
        if self.trainer is None or not torch.is_grad_enabled():
            return None
        return self.trainer.state.global_step + 1

    def _router_hook(self, name: str, block: int, rank: int, force: bool):
        def hook(module: Router, args: tuple, areas: torch.Tensor) -> torch.Tensor:
            if force:
                areas = areas % block + rank * block
            step = self._step()
            if module.training and step is not None:
                counts = torch.bincount(areas.flatten(), minlength=module.num_areas).tolist()
                previous = self.usage[name].get(step, [0] * module.num_areas)
                self.usage[name][step] = [a + b for a, b in zip(previous, counts, strict=True)]
            return areas

        return hook

    def _batch_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self._step()
        if not module.training or step is None:
            return None
        pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        sums = pixels.detach().flatten(1).double().sum(dim=1).tolist()
        for label, total in zip(kwargs["labels"].tolist(), sums, strict=True):
            self.samples.setdefault(step, []).append([label, round(total, 3)])
        return None

    def report(self) -> dict[str, Any]:
        return {
            "areas_used": {
                name: sorted({a for counts in steps.values() for a, n in enumerate(counts) if n})
                for name, steps in self.usage.items()
            },
            "usage": self.usage,
            "samples": self.samples,
            "running_means": {
                name: router.running_mean.tolist() for name, router in self.routers.items()
            },
        }


def training_arguments(args: argparse.Namespace) -> SALTrainingArguments:
    per_device, remainder = divmod(args.global_batch, _world_size() * args.grad_accum)
    if remainder or per_device < 1:
        raise ValueError(
            f"--global_batch {args.global_batch} must be a multiple of world size "
            f"{_world_size()} x grad_accum {args.grad_accum}."
        )
    return SALTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        area_learning_rate_scale=args.area_learning_rate_scale,
        head_learning_rate_scale=args.head_learning_rate_scale,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        optim=args.optim,
        bf16=args.bf16,
        lr_scheduler_type="constant",
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def gathered_state(trainer: SALTrainer) -> dict[str, torch.Tensor]:
    """The full parameters and persistent buffers, on CPU; a collective under ZeRO-3."""
    model = trainer.model
    gather = contextlib.nullcontext()
    if distributed_info(trainer)["zero_stage"] == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gather:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def changed_areas(
    initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor]
) -> dict[str, list[bool]]:
    return {
        name: [not torch.equal(before[k], final[name][k]) for k in range(before.shape[0])]
        for name, before in initial.items()
    }


def engine_info(wrapped: nn.Module) -> dict[str, Any]:
    """What wraps the model, and for a DeepSpeed engine the settings it really runs with."""
    cls = type(wrapped)
    info: dict[str, Any] = {"wrapper_class": f"{cls.__module__}.{cls.__qualname__}"}
    if hasattr(wrapped, "zero_optimization_stage"):
        info["engine_zero_stage"] = wrapped.zero_optimization_stage()
        info["engine_micro_batch"] = wrapped.train_micro_batch_size_per_gpu()
        info["engine_grad_accum"] = wrapped.gradient_accumulation_steps()
        info["engine_bf16"] = wrapped.bfloat16_enabled()
    return info


def group_learning_rates(trainer: SALTrainer) -> list[float]:
    """The learning rate of each parameter group of the optimizer that really steps (under
    ZeRO, DeepSpeed's optimizer shows the groups of the torch optimizer it wraps)."""
    return [group["lr"] for group in trainer.optimizer.param_groups]


def all_gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def step_losses(per_rank_history: list[list[dict]]) -> dict[int, dict[str, float]]:
    """Per step: the Trainer's `loss` and the mean over ranks of the ranks' `task_loss`."""
    steps: dict[int, dict[str, float]] = {}
    for entry in per_rank_history[0]:
        if "loss" in entry:
            steps[entry["step"]] = {"loss": entry["loss"]}
    for step in steps:
        task = [
            e["task_loss"] for h in per_rank_history for e in h
            if e.get("step") == step and "task_loss" in e
        ]
        steps[step]["task_loss"] = sum(task) / len(task)
    return steps


def write_report(
    args: argparse.Namespace,
    trainer: SALTrainer,
    global_step: int,
    ranks: list[dict[str, Any]],
    final: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
) -> None:
    final_weights = {n: final[f"{n}.weight"] for n in initial}
    report = {
        "global_step": global_step,
        "steps": step_losses([r.pop("log_history") for r in ranks]),
        "log_history": trainer.state.log_history,
        "distributed": {**distributed_info(trainer), **engine_info(trainer.model_wrapped)},
        "group_learning_rates": group_learning_rates(trainer),
        "final_checksum": checksum(final),
        "changed_areas": changed_areas(initial, final_weights),
        "ranks": ranks,
    }
    Path(args.output).write_text(json.dumps(report, indent=1))
    logger.info("Wrote the report of %d steps to %s.", global_step, args.output)
    if args.save_gathered:
        save_file(final, args.save_gathered, metadata={"format": "pt"})


def main() -> None:
    args = parse_args()
    model = build_model(args)
    area_layers = {n: m for n, m in model.named_modules() if isinstance(m, AreaLinear)}
    initial = {n: m.weight.detach().clone() for n, m in area_layers.items()}
    recorder = RunRecorder(model, force=args.force_rank_areas)
    dataset = load_image_dataset("mnist", limit=args.rows)["train"]
    trainer = SALTrainer(model=model, args=training_arguments(args), train_dataset=dataset)
    recorder.trainer = trainer
    result = trainer.train(resume_from_checkpoint=args.resume_from)

    final = gathered_state(trainer)
    rank_report = {
        "rank": _rank(),
        "checksum": checksum(final),
        "log_history": trainer.state.log_history,
        **recorder.report(),
    }
    ranks = all_gather(rank_report)
    if trainer.is_world_process_zero():
        write_report(args, trainer, result.global_step, ranks, final, initial)
    if dist.is_available() and dist.is_initialized():
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
