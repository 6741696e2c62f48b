"""The 1B recipe at a tiny size, which `tests/test_distributed.py` runs under cpu_zero3 and in
its own process as the one-process reference.

It trains what `recipes/train_llama_1b.py` trains, with the recipe's own functions,
ZeRO-3 limits and defaults (Shakespeare characters, per-token routing, plain SGD at the recipe's
rate with `max_grad_norm` 1.0, streamed regions), on a Llama of hidden size 32, 2 decoder layers,
4 heads, MLP width 64 and 4 areas. `train` returns the report and writes, in its output folder,
`initial.safetensors` and `final.safetensors`: every parameter before and after training,
gathered under ZeRO-3. The report has, per optimizer step (keys are the step as a string):

- `steps`: the Trainer's logged `loss` (task + router loss), `task_loss` and `grad_norm`;
- `ranks`: per rank, the `samples` of each step, a fingerprint per block of token ids;
- `distributed`: `sal_hf.reporting.distributed_info(trainer)`; `streamed`: whether every decoder
  layer ran checkpointed (recomputed in the backward pass; `--streamed false` keeps them whole).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from distributed_worker import all_gather, gathered_state
from helpers import load_recipe
from safetensors.torch import save_file
from transformers import default_data_collator, set_seed

from sal_hf.reporting import distributed_info
from sal_hf.trainer import SALTrainer

__all__ = ["TINY_LLAMA", "train"]

TINY_LLAMA = dict(
    hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_areas=4, block_size=32,
    eval_blocks=0,
)


@functools.cache
def _recipe():
    return load_recipe("train_llama_1b")


def _fingerprint(block: torch.Tensor) -> int:
    """One number per block of token ids (position-weighted, so reordered ids differ)."""
    positions = torch.arange(1, block.numel() + 1, dtype=torch.int64)
    return int((block.to(torch.int64) * positions).sum())


def _record_samples(model: torch.nn.Module, trainer: SALTrainer) -> dict[str, list[list[int]]]:
    """Per step being trained, the fingerprints of the blocks this rank's model receives."""
    samples: dict[str, list[list[int]]] = {}

    def hook(module, args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():
            step = str(trainer.state.global_step + 1)
            samples.setdefault(step, []).extend([_fingerprint(b)] for b in kwargs["input_ids"])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return samples


def _logged_steps(log_history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("loss", "task_loss", "grad_norm")
    return {
        str(entry["step"]): {key: entry[key] for key in keys}
        for entry in log_history if "loss" in entry and "train_runtime" not in entry
    }


def train(
    output_dir: Path, max_steps: int, global_batch: int = 8, streamed: bool = True,
    extra_arguments: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train the tiny model with the recipe's code; every rank returns the report."""
    recipe = _recipe()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if global_batch % world_size:
        raise ValueError(
            f"global_batch {global_batch} must be a multiple of the world size {world_size}."
        )
    args = recipe.Llama1BArguments(**TINY_LLAMA)
    set_seed(args.init_seed)
    vocabulary, blocks, _ = recipe.load_blocks(args)
    model = recipe.build_model(args, len(vocabulary))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    training_args = recipe.training_arguments(
        ["--output_dir", str(output_dir / "trainer"), "--max_steps", str(max_steps),
         "--per_device_train_batch_size", str(global_batch // world_size),
         "--activation_checkpointing", str(streamed), *extra_arguments],
        args.eval_blocks,
    )
    trainer = SALTrainer(
        model=model, args=training_args, train_dataset=blocks,
        data_collator=default_data_collator,
    )
    recipe.limit_zero3_memory(trainer)
    samples = _record_samples(model, trainer)
    trainer.train()

    final = gathered_state(trainer)  # a collective under ZeRO-3: every rank takes part
    ranks = all_gather({"samples": samples})
    if trainer.is_world_process_zero():
        save_file(initial, output_dir / "initial.safetensors")
        save_file({name: final[name] for name in initial}, output_dir / "final.safetensors")
    return {
        "steps": _logged_steps(trainer.state.log_history),
        "ranks": ranks,
        "distributed": distributed_info(trainer),
        "streamed": all(layer.gradient_checkpointing for layer in model.model.layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="path of the JSON report")
    parser.add_argument("--output_dir", required=True, help="folder of the weights and Trainer")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=8, help="blocks per optimizer step")
    parser.add_argument("--streamed", choices=["true", "false"], default="true")
    options = parser.parse_args()
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = train(
        output_dir, options.max_steps, options.global_batch, options.streamed == "true"
    )
    if int(os.environ.get("RANK", "0")) == 0:
        Path(options.output).write_text(json.dumps(report, indent=1))
    _recipe().exit_together()


if __name__ == "__main__":
    main()
