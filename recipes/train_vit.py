"""Train a small Vision Transformer from scratch on MNIST or Fashion-MNIST with SAL, DFA or BP.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/train_vit.py \
        --dataset fashion_mnist --method sal --num_areas 4 --output_dir outputs/fmnist-vit-sal4

The model is `ViTForImageClassification` built from a `ViTConfig` (no pretrained ViT exists
offline) on 28x28 one-channel images cut into `--patch_size` patches (4 or 7), converted with
`convert_to_sal`. Writes `results.json` (test accuracy, step time, peak memory, area usage),
`learning_curves.png` and the SAL checkpoint.

Every `TrainingArguments` option is accepted; the defaults are the tuned recipe.
"""

from __future__ import annotations

import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    HfArgumentParser,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from sal_hf import SALConfig, convert_to_sal, parameter_counts
from sal_hf.data import image_dataset_info, load_image_dataset
from sal_hf.reporting import (
    PeakMemory,
    StepTimer,
    distributed_info,
    plot_learning_curves,
    quiet_deprecated_collectives,
    write_results,
)
from sal_hf.trainer import SALTrainer, SALTrainingArguments, area_learning_rate_scale

logger = logging.getLogger("train_vit")

VIT_DATASETS = ("mnist", "fashion_mnist")
IMAGE_SIZE = 28

TUNED_DEFAULTS = dict(
    learning_rate=1e-3,
    per_device_train_batch_size=128,
    per_device_eval_batch_size=512,
    num_train_epochs=5,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    weight_decay=0.05,
    max_grad_norm=1.0,
    eval_strategy="epoch",
    save_strategy="no",
    logging_steps=50,
    report_to="none",
    seed=0,
)


@dataclass
class ViTArguments:
    dataset: str = field(default="mnist", metadata={"help": f"One of {VIT_DATASETS}."})
    patch_size: int = field(default=7, metadata={"help": "Patch side in pixels: 4 or 7."})
    num_layers: int = field(default=4, metadata={"help": "Number of transformer blocks."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads per block."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP width (default: 4 x hidden)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout of every layer."})
    method: str = field(default="sal", metadata={"help": "sal, dfa or bp."})
    num_areas: int | None = field(
        default=None, metadata={"help": "Areas per MLP layer (default: 16 for sal, 1 otherwise)."}
    )
    routing: str = field(default="sample", metadata={"help": "'sample' or 'token' routing."})
    feedback: str = field(default="region", metadata={"help": "'region' or 'area' feedback."})
    feedback_scale: float = field(default=1.0, metadata={"help": "Scale of feedback matrices."})
    routing_dim: int = field(default=32, metadata={"help": "Width of the routing space."})
    shared_path: bool = field(default=False, metadata={"help": "Add an always-on dense path."})
    sal_seed: int = field(default=0, metadata={"help": "Seed of prototypes and feedback."})
    limit: int | None = field(
        default=None, metadata={"help": "Keep the first N rows of each split (smoke tests)."}
    )


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ViTArguments, SALTrainingArguments))
    parser.set_defaults(**TUNED_DEFAULTS)
    args, training_args = parser.parse_args_into_dataclasses(argv)
    if args.dataset not in VIT_DATASETS:
        parser.error(f"--dataset {args.dataset!r} is unknown; use one of {VIT_DATASETS}.")
    if IMAGE_SIZE % args.patch_size:
        parser.error(f"--patch_size must divide {IMAGE_SIZE} (4, 7, 14), got {args.patch_size}.")
    return args, training_args


def build_model(args: ViTArguments, num_labels: int) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=args.patch_size, num_channels=1,
        hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
        num_labels=num_labels,
    )
    sal_config = SALConfig(
        method=args.method, num_areas=args.num_areas, routing=args.routing,
        feedback=args.feedback, feedback_scale=args.feedback_scale,
        routing_dim=args.routing_dim, shared_path=args.shared_path, seed=args.sal_seed,
    )
    return convert_to_sal(ViTForImageClassification(config), sal_config)


def main(argv: list[str] | None = None) -> dict:
    quiet_deprecated_collectives()
    args, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    info = image_dataset_info(args.dataset)
    splits = load_image_dataset(
        args.dataset, seed=training_args.seed, flatten=False, limit=args.limit
    )
    model = build_model(args, info["num_labels"])
    timer = StepTimer()
    trainer = SALTrainer(
        model=model, args=training_args, train_dataset=splits["train"],
        eval_dataset=splits["validation"], callbacks=[timer],
    )
    with PeakMemory() as memory:
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    test_metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")
    results = collect_results(args, training_args, trainer, train_output, test_metrics, memory,
                              timer)
    if trainer.is_world_process_zero():
        finish(trainer, results, Path(training_args.output_dir), args)
    return results


def collect_results(args, training_args, trainer, train_output, test_metrics, memory,
                    timer) -> dict:
    step_time = sum(timer.durations) / max(len(timer.durations), 1)
    counts = parameter_counts(trainer.model)
    sal_config = trainer.sal_controller.sal_config
    return {
        "dataset": args.dataset, "patch_size": args.patch_size,
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "method": args.method, "num_areas": sal_config.num_areas, "routing": sal_config.routing,
        "test_accuracy": test_metrics["test_accuracy"], "test_loss": test_metrics["test_loss"],
        "best_validation_accuracy": max(
            (e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e),
            default=None,
        ),
        "epochs": train_output.metrics.get("epoch", trainer.state.epoch),
        "global_steps": train_output.global_step,
        "train_runtime_s": round(train_output.metrics["train_runtime"], 2),
        "step_time_ms": round(1000 * step_time, 3),
        "median_step_time_ms": round(1000 * statistics.median(timer.durations or [0.0]), 3),
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
        **memory.as_dict(),
        "area_usage": trainer.last_area_usage,
        "total_parameters": counts["total"], "active_parameters": counts["active"],
        "learning_rate": training_args.learning_rate,
        "area_learning_rate_scale": area_learning_rate_scale(training_args, sal_config.num_areas),
        "batch_size": training_args.per_device_train_batch_size,
        "seed": training_args.seed, "sal_seed": args.sal_seed,
        "sal_config": sal_config.to_dict(),
        "torch_threads": torch.get_num_threads(),
        **distributed_info(trainer),
    }


def finish(trainer, results: dict, output_dir: Path, args: ViTArguments) -> None:
    label = f"SAL-{results['num_areas']}" if args.method == "sal" else args.method.upper()
    plot = plot_learning_curves(
        {label: trainer.state.log_history}, output_dir / "learning_curves.png",
        title=f"ViT on {args.dataset}: {label}",
    )
    results["learning_curves"] = plot.name
    trainer.save_model(str(output_dir))
    trainer.save_state()
    write_results(output_dir / "results.json", results)
    summary = {k: results[k] for k in ("test_accuracy", "train_runtime_s", "peak_memory_mb")}
    logger.info("Results in %s: %s", output_dir / "results.json", summary)


if __name__ == "__main__":
    main(sys.argv[1:])
