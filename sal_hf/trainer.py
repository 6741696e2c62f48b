"""`SALTrainer`: the `transformers.Trainer` for SAL models.

SAL lives in the model (region hooks and the feedback tap), so the Trainer's own loop, with one
`backward()` per micro-batch, already applies the SAL update; everything `TrainingArguments`
offers (gradient accumulation, evaluation, checkpointing and resuming, `report_to`, schedules,
Accelerate and DeepSpeed) keeps working. The subclass adds only what SAL needs: the routers'
local loss joins the task loss before that backward, area usage and both losses are logged, and
classifiers are evaluated for accuracy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from .areas import AreaLinear
from .regions import SALController, get_controller
from .routing import usage_entropy

__all__ = [
    "SALTrainer", "SALTrainingArguments", "accuracy_metrics", "area_learning_rate_scale",
    "argmax_logits", "option_given",
]

logger = logging.getLogger(__name__)


@dataclass
class SALTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the SAL logging options."""

    log_area_usage: bool = field(
        default=True,
        metadata={"help": "Log, per SAL layer, the entropy and largest share of area usage."},
    )
    area_learning_rate_scale: float | None = field(
        default=None,
        metadata={
            "help": "Learning-rate multiplier for area weights (layers with several areas). "
            "Unset: 1/sqrt(num_areas), since an area's gradient comes from about 1/num_areas of "
            "the batch and is that much noisier."
        },
    )

    head_learning_rate_scale: float = field(
        default=1.0,
        metadata={
            "help": "Learning-rate multiplier for the head (the layers after the last region, "
            "trained by their true gradient): a new head on a pretrained body often wants a "
            "larger rate than the body. A head weight tied to the embeddings moves with it."
        },
    )

    def __post_init__(self) -> None:
        several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if several_processes and self.ddp_backend is None and not torch.cuda.is_available():
            # Without it, Accelerate under DeepSpeed's CPU accelerator sees one process per rank.
            self.ddp_backend = "gloo"
        # The router loss is not reachable from the model outputs, so DDP's unused-parameter
        # search would mark router parameters ready twice; every parameter is used each step.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        # Broadcasting buffers would copy rank 0's usage counts over the others and resend the
        # fixed feedback matrices every step; routers keep their running means in step instead.
        if self.ddp_broadcast_buffers is None:
            self.ddp_broadcast_buffers = False
        super().__post_init__()
        scale = self.area_learning_rate_scale
        if scale is not None and not scale > 0:
            raise ValueError(f"area_learning_rate_scale must be > 0, got {scale!r}.")
        if not self.head_learning_rate_scale > 0:
            raise ValueError(
                f"head_learning_rate_scale must be > 0, got {self.head_learning_rate_scale!r}."
            )


def option_given(argv: list[str], name: str) -> bool:
    """Whether the command line `argv` sets the option `--name` (either spelling, `=` or not):
    how a recipe tells a value the user chose from the parser's default, to put its own tuned
    default in its place. Parse with `allow_abbrev = False`, or an abbreviation escapes this."""
    spellings = (f"--{name}", f"--{name.replace('_', '-')}")
    return any(arg in spellings or arg.startswith(tuple(f"{s}=" for s in spellings))
               for arg in argv)


def area_learning_rate_scale(args: SALTrainingArguments, num_areas: int) -> float | None:
    """The multiplier `SALTrainer` applies to area weights' learning rate; None for one area."""
    if num_areas < 2:
        return None
    return args.area_learning_rate_scale or num_areas**-0.5


def accuracy_metrics(eval_prediction) -> dict[str, float]:
    """Classification accuracy, for `compute_metrics` (expects predictions from `argmax_logits`).

    Positions labelled -100 (the ignored index: padding and special tokens of a token
    classifier) are not counted.
    """
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    counted = labels != -100
    if not counted.any():
        return {"accuracy": float("nan")}
    return {"accuracy": float(np.mean(predictions[counted] == labels[counted]))}


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics` that keeps only the predicted class."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


_LANGUAGE_MODELS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(
    MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()
)


def _is_language_model(model) -> bool:
    """True for a causal or masked language model (`GPT2LMHeadModel`, `LlamaForCausalLM`, ...),
    whose predictions are not class labels comparable position by position.

    The class decides, not `config.architectures`: a classifier loaded from a language model's
    checkpoint keeps that checkpoint's architectures."""
    name = type(model).__name__
    return name in _LANGUAGE_MODELS or "CausalLM" in name or "MaskedLM" in name


def _predicts_single_labels(model) -> bool:
    """Whether arg-max accuracy means something: not for a language model, a regression
    (`num_labels == 1`) or a multi-label classifier."""
    config = getattr(model, "config", None)
    if _is_language_model(model) or getattr(config, "num_labels", 2) < 2:
        return False
    return getattr(config, "problem_type", None) in (None, "single_label_classification")


class _OutputHooksLast(TrainerCallback):
    """Puts SAL's output hooks after those of the wrapper the Trainer has just built."""

    def __init__(self, controller: SALController) -> None:
        self.controller = controller

    def on_train_begin(self, args, state, control, **kwargs):
        self.controller.put_output_hooks_last()


class SALTrainer(Trainer):
    """A `Trainer` for models converted by `sal_hf.convert_to_sal` (or loaded by `AutoSAL*`).

    Takes the same arguments as `transformers.Trainer`. For classifiers, when neither
    `compute_metrics` nor `preprocess_logits_for_metrics` is given, evaluation reports accuracy.
    After `evaluate` or `predict`, `last_area_usage` holds, per SAL layer, the fraction of the
    evaluated samples (or tokens) each area received.
    """

    def __init__(self, model=None, args=None, *positional, **kwargs) -> None:
        controller = get_controller(model) if model is not None else None
        if controller is None:
            raise ValueError(
                "SALTrainer needs a SAL model: convert yours with "
                "sal_hf.convert_to_sal(model, SALConfig(...)) or load a SAL checkpoint with an "
                "AutoSAL class. For ordinary backprop on the same model use SALConfig(method='bp')."
            )
        metrics_unset = kwargs.get("compute_metrics") is None and (
            "preprocess_logits_for_metrics" not in kwargs
        )
        if not positional and metrics_unset and _predicts_single_labels(model):
            kwargs["compute_metrics"] = accuracy_metrics
            kwargs["preprocess_logits_for_metrics"] = argmax_logits
        super().__init__(model, args, *positional, **kwargs)
        self.sal_controller: SALController = controller
        self.last_area_usage: dict[str, list[float]] = {}
        # Task loss, its weight (micro-batches, or steps), router loss, micro-batches.
        self._loss_sums = torch.zeros(4, dtype=torch.float64)
        self._split_optimizer: torch.optim.Optimizer | None = None
        self.add_callback(_OutputHooksLast(controller))
        self._refuse_unsynchronised_processes()
        self._warn_if_fsdp_dropped()

    def _refuse_unsynchronised_processes(self) -> None:
        """Stop when several processes were launched but Accelerate distributes none of them.

        A launcher of several processes (torchrun, which `accelerate launch` uses for
        MULTI_GPU-type configs such as cpu_ddp.yaml) sets WORLD_SIZE in each. On CPUs, unless
        the processes are told to use the CPU, Accelerate finds no GPU-type device and keeps
        distributed type NO: every process would then train its own copy of the model on its
        own share of the data, with nothing to say so.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        running = self.accelerator.distributed_type
        if world_size > 1 and running == DistributedType.NO:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but Accelerate's distributed type is "
                f"{str(running).split('.')[-1]}: each of the {world_size} processes would train "
                "its own unsynchronised copy of the model. On CPUs, set ACCELERATE_USE_CPU=1 for "
                "the launch (ACCELERATE_USE_CPU=1 accelerate launch --config_file "
                "accelerate_configs/cpu_ddp.yaml ...): a config's `use_cpu: true` reaches the "
                "processes through Accelerate's single-process and mpirun launchers only, not "
                "through the torchrun launcher of a MULTI_GPU-type config."
            )

    def _warn_if_fsdp_dropped(self) -> None:
        """Warn when FSDP was asked for (an FSDP accelerate config, or `fsdp=`) but does not run.

        Accelerate makes a run FSDP only when its processes are of a GPU-like type
        (`AcceleratorState` switches to FSDP from MULTI_GPU, MULTI_XPU, ... but never from
        MULTI_CPU); CPU processes with ACCELERATE_USE_CPU=1 silently run DDP instead (without
        it, `_refuse_unsynchronised_processes` has stopped the run already).
        """
        requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        running = self.accelerator.distributed_type
        if requested and running != DistributedType.FSDP:
            logger.warning(
                "FSDP was requested but Accelerate runs %s on %d process(es): Accelerate enables "
                "FSDP only on GPU-type devices. On CPUs use accelerate_configs/cpu_ddp.yaml or "
                "cpu_zero3.yaml (sharded) instead.",
                str(running).split(".")[-1], self.accelerator.num_processes,
            )

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with area weights (and the head, if its scale is not 1) in
        their own groups at scaled rates.

        The groups are split once per optimizer: the Trainer calls this method again on an
        optimizer it already has (twice under DeepSpeed, from `deepspeed_init` and again before
        `accelerator.prepare`; once more on every later `train()`), and splitting again would
        multiply the scaled rates by their scale a second time. A DeepSpeed config that names
        its own optimizer bypasses this method, and with it the scales.
        """
        optimizer = super().create_optimizer(model)
        if optimizer is self._split_optimizer:
            return optimizer
        area_parameters = {
            id(parameter)
            for module in self.model.modules()
            if isinstance(module, AreaLinear) and module.num_areas > 1
            for name, parameter in module.named_parameters()
            if not name.startswith("shared.")
        }
        head_scale = self.args.head_learning_rate_scale
        head_parameters = set()
        if head_scale != 1.0:
            head_parameters = {id(p) for p in self.sal_controller.head_parameters()}
            area_parameters -= head_parameters
        if not area_parameters and not head_parameters:
            return optimizer
        scale = area_learning_rate_scale(self.args, self.sal_controller.sal_config.num_areas)
        scale = 1.0 if scale is None else scale
        groups = list(optimizer.param_groups)
        optimizer.param_groups.clear()
        for group in groups:
            areas = [p for p in group["params"] if id(p) in area_parameters]
            head = [p for p in group["params"] if id(p) in head_parameters]
            others = [p for p in group["params"]
                      if id(p) not in area_parameters and id(p) not in head_parameters]
            for params, factor in ((others, 1.0), (areas, scale), (head, head_scale)):
                if params:
                    learning_rate = group["lr"] * factor
                    optimizer.add_param_group({**group, "params": params, "lr": learning_rate})
        logger.info("Area weights train at %.4g x the learning rate, the head at %.4g x.",
                    scale, head_scale)
        self._split_optimizer = optimizer
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        router_loss = self.sal_controller.router_loss() if model.training else None
        # The task loss may already be normalised over the whole accumulated batch: then the
        # micro-batches of a step add up to the step's mean, and the Trainer does not divide it.
        # The router loss is a per-micro-batch mean either way.
        accumulated = self._loss_is_scaled_for_ga(num_items_in_batch)
        if model.training:
            self._add_to_logged_losses(loss, router_loss, accumulated)
        if router_loss is not None:
            if accumulated:
                router_loss = router_loss / self.current_gradient_accumulation_steps
            loss = loss + router_loss.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The Trainer's own rule (`training_step`) for whether it divides the loss by the
        gradient accumulation steps: the router loss and the logged task loss must follow it."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def _add_to_logged_losses(self, loss, router_loss, accumulated: bool) -> None:
        # Summed on the device: reading the values every step would synchronise a GPU.
        task = loss.detach().double()
        router = torch.zeros_like(task) if router_loss is None else router_loss.detach().double()
        task_weight = 1.0 / self.current_gradient_accumulation_steps if accumulated else 1.0
        step = torch.stack([task, task.new_tensor(task_weight), router, torch.ones_like(task)])
        self._loss_sums = self._loss_sums.to(step.device) + step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_sums[3] > 0:
            # Every rank reaches this point (the Trainer gathers the loss just before).
            sums = self.accelerator.reduce(self._loss_sums.to(self.args.device), reduction="sum")
            task, task_weight, router, micro_batches = sums.tolist()
            logs["task_loss"] = round(task / task_weight, 6)
            if self.sal_controller.routers:
                logs["router_loss"] = round(router / micro_batches, 6)
            self._loss_sums.zero_()
            if self.args.log_area_usage:
                logs.update(self._usage_metrics("train", prefix=""))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix="eval"):
        self.sal_controller.take_usage("eval")  # start counting from zero
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.args.log_area_usage:
            output.metrics.update(self._usage_metrics("eval", prefix=f"{metric_key_prefix}_"))
        return output

    def _usage_metrics(self, split: str, prefix: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        usage = self.sal_controller.take_usage(split)
        fractions = {}
        for name, counts in usage.items():
            counts = self.accelerator.reduce(counts.to(self.args.device), reduction="sum").cpu()
            total = float(counts.sum())
            if total == 0:
                continue
            fractions[name] = (counts / total).tolist()
            metrics[f"{prefix}area_entropy/{name}"] = round(usage_entropy(counts), 4)
            metrics[f"{prefix}area_max_share/{name}"] = round(float(counts.max()) / total, 4)
        if split == "eval":
            self.last_area_usage = fractions
        return metrics
