"""Train a Llama-architecture SAL language model of 1.0B parameters from scratch.

Two CPU processes under DeepSpeed ZeRO-3 (what `benchmarks/llama_1b.py` runs):

    accelerate launch --config_file accelerate_configs/cpu_zero3.yaml --main_process_port 29500 \
        recipes/train_llama_1b.py --max_steps 20 --output_dir outputs/llama-1b

N GPUs (one process each), ZeRO-3 with bf16 and AdamW, which fit there:

    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes N \
        recipes/train_llama_1b.py --bf16 true --optim adamw_torch --learning_rate 3e-4 \
        --lr_scheduler_type cosine --warmup_steps 0.02 --per_device_train_batch_size 16 \
        --block_size 256 --max_steps 5000 --output_dir outputs/llama-1b

The model (defaults): hidden 768, 13 decoder layers, 12 heads, MLP width 2048, whose three MLP
projections become area layers of 16 areas with per-token routing. That is 1.01B parameters in
all, of which 92.5M (one area per layer) act on any one token. The text is the Shakespeare corpus
with one token per character (84 characters), which keeps the embedding and head small.

The defaults fit 1B parameters in CPU memory shared by two processes. Training in fp32 costs 4
bytes per parameter for the weights, 4 for the gradients and, under ZeRO-3, 4 for the fp32
master copy the optimizer updates, each split across the processes; AdamW would add 8 more. So
the defaults use plain SGD (no optimizer state), with a constant learning rate, short blocks
and small batches, and lower DeepSpeed's ZeRO-3 buffer sizes (`ZERO3_MEMORY_LIMITS`).

They also train in SAL's streamed mode (`--activation_checkpointing true`): each decoder layer
keeps only its input and is recomputed during its update. Under ZeRO-3 this matters beyond
activations: an area layer's grouped product saves views of its gathered weights for the
backward pass, which keep them gathered from forward to backward (4 bytes per parameter per
rank, as if unpartitioned); recomputed regions save nothing of the kind. Measured at 312M
parameters, both modes give identical losses and the streamed one peaks 20% lower per rank.

The routers' settings suit that SGD. A router normalises a small centred projection of its
layer's input, so its local loss has a gradient of order 1/|projection|; under SGD its weights
set both the routers' step and their share of the gradient norm that `max_grad_norm` clips. With
SALConfig's settings (prototype term 0.1, balance term 1.0, centring momentum 0.99) the routers
made up most of that norm (39 of 50 at step 2) and routing lurched. The defaults weigh the
router terms 100x less and centre each batch with its own mean (momentum 0): the body moves fast
at this rate, and a lagging mean tips a deeper layer's tokens toward a few areas. Measured on
this model in one process (whose losses match the two-process run's), 20 steps, per layer and
step: usage entropy 0.90 of log 16 at the median, 0.84 at the 10th percentile, 0.70 at the
lowest, against 0.52, 0.21 and 0 (one area); the routers' share of the gradient norm 9% against
53% (median); validation loss 3.437 against 3.454.

Validation usage after training is lower (median layer near 0.4 of log 16): evaluation centres
with the mean of the last training batch, taken one update before the final weights. Recomputed
with the final weights on 16 training blocks, the same mean gives 0.91 (lowest layer 0.85).

The model is built and converted before `TrainingArguments` is created: with `zero3_init_flag`
off (as in the accelerate configs), `convert_to_sal` copies each dense MLP into its areas on
whole tensors, and DeepSpeed partitions them when the Trainer starts.

Writes `results.json` in `--output_dir`: parameter counts, at every step the loss, the routers'
loss, the gradient norm before clipping and each layer's area-usage entropy over log(areas);
validation loss before and after and, on the validation blocks after training, each layer's
fraction of tokens per area; step times, and peak memory per process.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.distributed as dist
import transformers
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    default_data_collator,
    set_seed,
)

from sal_hf import SALConfig, convert_to_sal, parameter_counts
from sal_hf.data import CORPORA, load_corpus, split_corpus
from sal_hf.reporting import (
    PeakMemory,
    StepTimer,
    distributed_info,
    quiet_deprecated_collectives,
    usage_entropy_ratio,
    write_results,
)
from sal_hf.routing import max_entropy
from sal_hf.trainer import SALTrainer, SALTrainingArguments

logger = logging.getLogger("train_llama_1b")

TRAINING_DEFAULTS = dict(
    optim="sgd",  # stateless: no optimizer memory beside the weights and gradients
    activation_checkpointing=True,  # SAL's streamed mode: see the module docstring
    learning_rate=0.5,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    max_steps=20,
    logging_steps=1,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=0,
)

# DeepSpeed's stock ZeRO-3 sizes suit GPUs with room to spare, not 1B parameters in shared CPU
# memory (counts are elements):
# - a parameter due again within `stage3_max_reuse_distance` stays gathered, and up to
#   `stage3_max_live_parameters` may be (both 1e9: most of a 1B model, whole, on every rank);
# - `reduce_bucket_size` (5e8) is a gradient buffer allocated on every rank, 2 GB in fp32;
# - `sub_group_size` (1e9) makes each rank's partition one piece in the optimizer step, whose
#   gradient norm converts it to fp64: a transient twice the partition's size.
ZERO3_MEMORY_LIMITS = dict(
    stage3_max_live_parameters=100_000_000,
    stage3_max_reuse_distance=100_000_000,
    stage3_prefetch_bucket_size=20_000_000,
    reduce_bucket_size=20_000_000,
    sub_group_size=50_000_000,
)


@dataclass
class Llama1BArguments:
    hidden_size: int = field(default=768, metadata={"help": "Model width."})
    num_layers: int = field(default=13, metadata={"help": "Decoder layers (SAL regions)."})
    num_heads: int = field(default=12, metadata={"help": "Attention heads per layer."})
    intermediate_size: int = field(default=2048, metadata={"help": "MLP width."})
    num_areas: int = field(default=16, metadata={"help": "Areas per MLP projection."})
    routing: str = field(default="token", metadata={"help": "'token' or 'sample' routing."})
    corpus: str = field(default="shakespeare", metadata={"help": f"One of {CORPORA}."})
    block_size: int = field(default=64, metadata={"help": "Characters per training sequence."})
    eval_blocks: int = field(
        default=16, metadata={"help": "Validation blocks scored before and after training."}
    )
    zero3_memory_limits: bool = field(
        default=True, metadata={"help": "Apply ZERO3_MEMORY_LIMITS (see the recipe's code)."}
    )
    prototype_loss_weight: float = field(
        default=0.001, metadata={"help": "Routers' prototype term (SALConfig's default is 0.1)."}
    )
    balance_loss_weight: float = field(
        default=0.01, metadata={"help": "Routers' balance term (SALConfig's default is 1.0)."}
    )
    router_momentum: float = field(
        default=0.0,
        metadata={"help": "Momentum of the mean that centres routing (SALConfig's is 0.99)."},
    )
    sal_seed: int = field(default=0, metadata={"help": "Seed of prototypes and feedback."})
    init_seed: int = field(default=0, metadata={"help": "Seed of the initial weights."})


class CharVocabulary:
    """One token per character of the training text; unseen characters map to id 0."""

    def __init__(self, text: str) -> None:
        self.characters = ["<unk>", *sorted(set(text))]
        self._ids = {character: index for index, character in enumerate(self.characters)}

    def __len__(self) -> int:
        return len(self.characters)

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter((self._ids.get(c, 0) for c in text), dtype=np.int64, count=len(text))


def to_blocks(ids: np.ndarray, block_size: int, limit: int | None = None) -> datasets.Dataset:
    """Consecutive blocks of `block_size` tokens (labels are the inputs: the model shifts)."""
    num_blocks = len(ids) // block_size
    if limit is not None:
        num_blocks = min(num_blocks, limit)
    if num_blocks == 0:
        raise ValueError(f"{len(ids)} tokens make no block of {block_size}; lower --block_size.")
    blocks = ids[: num_blocks * block_size].reshape(num_blocks, block_size)
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")


def llama_config(args: Llama1BArguments, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
        max_position_embeddings=max(args.block_size, 256), tie_word_embeddings=False,
    )


def build_model(args: Llama1BArguments, vocab_size: int) -> LlamaForCausalLM:
    """The SAL model: a freshly initialised Llama whose MLPs become 16-area layers, with the
    router settings of `args` (see the module docstring).

    Built on the current default device, so `with torch.device("meta"):` counts its parameters
    without allocating them.
    """
    model = LlamaForCausalLM(llama_config(args, vocab_size))
    sal_config = SALConfig(
        method="sal", num_areas=args.num_areas, routing=args.routing, seed=args.sal_seed,
        prototype_loss_weight=args.prototype_loss_weight,
        balance_loss_weight=args.balance_loss_weight, router_momentum=args.router_momentum,
    )
    return convert_to_sal(model, sal_config)


def limit_zero3_memory(trainer: SALTrainer) -> dict | None:
    """Apply `ZERO3_MEMORY_LIMITS` to the DeepSpeed config (values a user's JSON sets are kept).

    The Trainer hands the plugin's config to DeepSpeed when training starts, so it can still be
    changed here. Returns the values DeepSpeed will use, or None when not under ZeRO-3.
    """
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return None
    zero = plugin.hf_ds_config.config["zero_optimization"]
    for key, value in ZERO3_MEMORY_LIMITS.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    return {key: zero[key] for key in ZERO3_MEMORY_LIMITS}


def parse_arguments(argv: list[str]) -> tuple[Llama1BArguments, list[str]]:
    if "-h" in argv or "--help" in argv:
        HfArgumentParser((Llama1BArguments, SALTrainingArguments)).parse_args(argv)
    parser = HfArgumentParser(Llama1BArguments)
    args, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if args.corpus not in CORPORA:
        parser.error(f"--corpus {args.corpus!r} is unknown; use one of {CORPORA}.")
    return args, remaining


def training_arguments(remaining: list[str], eval_blocks: int) -> SALTrainingArguments:
    """`TrainingArguments` from the rest of the command line; create it after the model."""
    parser = HfArgumentParser(SALTrainingArguments)
    parser.set_defaults(**TRAINING_DEFAULTS)
    (training_args,) = parser.parse_args_into_dataclasses(remaining)
    if eval_blocks > 0 and training_args.eval_strategy == "no":
        # Validation loss at the start and at the last step, inside `train` (under DeepSpeed an
        # `evaluate` before `train` would build a second engine).
        training_args.eval_strategy = "steps"
        training_args.eval_steps = training_args.max_steps
        training_args.eval_on_start = True
    return training_args


def load_blocks(args: Llama1BArguments) -> tuple[CharVocabulary, datasets.Dataset, ...]:
    """The vocabulary, the training blocks and `eval_blocks` validation blocks (or None)."""
    train_text, validation_text = split_corpus(load_corpus(args.corpus))
    vocabulary = CharVocabulary(train_text)
    train = to_blocks(vocabulary.encode(train_text), args.block_size)
    validation = None
    if args.eval_blocks > 0:
        validation_ids = vocabulary.encode(validation_text)
        validation = to_blocks(validation_ids, args.block_size, args.eval_blocks)
    return vocabulary, train, validation


def main(argv: list[str]) -> dict:
    quiet_deprecated_collectives()
    args, remaining = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else 30)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.init_seed)
    vocabulary, train_blocks, validation_blocks = load_blocks(args)
    model = build_model(args, len(vocabulary))  # before TrainingArguments: see the docstring
    counts = parameter_counts(model)
    logger.info("SAL Llama: %.3fB parameters, %.1fM active per token.",
                counts["total"] / 1e9, counts["active"] / 1e6)

    training_args = training_arguments(remaining, args.eval_blocks)
    recorder = StepTimer()
    trainer = SALTrainer(
        model=model, args=training_args, train_dataset=train_blocks,
        eval_dataset=validation_blocks,
        data_collator=default_data_collator, callbacks=[recorder],
        preprocess_logits_for_metrics=None,
    )
    zero3_limits = limit_zero3_memory(trainer) if args.zero3_memory_limits else None
    with PeakMemory() as memory:
        train_output = trainer.train()
    results = collect_results(args, training_args, trainer, train_output, memory, recorder)
    results.update(
        vocab_size=len(vocabulary), zero3_limits=zero3_limits, eval_blocks=args.eval_blocks,
        total_parameters=counts["total"], active_parameters_per_token=counts["active"],
    )
    if trainer.is_world_process_zero():
        write_results(Path(training_args.output_dir) / "results.json", results)
        logger.info("Results in %s", Path(training_args.output_dir) / "results.json")
    exit_together()
    return results


def per_rank(value):
    """`value` from every rank, in rank order (a list of one without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def held_parameters(trainer: SALTrainer) -> int:
    """Parameter elements this rank stores: its ZeRO-3 partition, or the whole model."""
    return sum(getattr(p, "ds_tensor", p).numel() for p in trainer.model.parameters())


def entropy_ratios(entry: dict, num_areas: int, prefix: str = "") -> dict[str, float]:
    """Per SAL layer, the logged usage entropy over log(num_areas): 1 is uniform usage."""
    key = f"{prefix}area_entropy/"
    return {name[len(key):]: round(value / max_entropy(num_areas), 4)
            for name, value in entry.items() if name.startswith(key)}


def area_usage(trainer: SALTrainer) -> dict[str, dict]:
    """Per SAL layer, usage on the last evaluation (every rank's tokens): the fraction of tokens
    per area, its entropy over log(areas) and the largest fraction."""
    usage = {}
    for name, fractions in trainer.last_area_usage.items():
        usage[name] = {"fractions": [round(f, 5) for f in fractions],
                       "entropy_ratio": round(usage_entropy_ratio(fractions), 4),
                       "max_share": round(max(fractions), 4)}
    return usage


def collect_results(args, training_args, trainer, train_output, memory, recorder) -> dict:
    history = trainer.state.log_history
    # `grad_norm` is the norm before clipping to `max_grad_norm`, router gradients included.
    steps = [
        {"step": e["step"], "loss": e["loss"], "task_loss": e.get("task_loss"),
         "router_loss": e.get("router_loss"), "grad_norm": e.get("grad_norm"),
         "area_entropy_ratio": entropy_ratios(e, args.num_areas)}
        for e in history if "loss" in e and "train_runtime" not in e
    ]
    evaluations = [{"step": e["step"], "eval_loss": e["eval_loss"]}
                   for e in history if "eval_loss" in e]
    memory_per_rank = per_rank({**memory.as_dict(), "held_parameters": held_parameters(trainer)})
    step_times = recorder.durations[1:] or recorder.durations  # the first one builds buffers
    engine = trainer.model_wrapped
    return {
        "model": "LlamaForCausalLM (SAL)", "hidden_size": args.hidden_size,
        "num_layers": args.num_layers, "num_heads": args.num_heads,
        "intermediate_size": args.intermediate_size, "num_areas": args.num_areas,
        "routing": args.routing, "corpus": args.corpus, "tokenizer": "char",
        "block_size": args.block_size, "steps": steps, "evaluations": evaluations,
        "area_usage": area_usage(trainer),
        "prototype_loss_weight": args.prototype_loss_weight,
        "balance_loss_weight": args.balance_loss_weight, "router_momentum": args.router_momentum,
        "max_grad_norm": training_args.max_grad_norm,
        "global_steps": train_output.global_step,
        "train_runtime_s": round(train_output.metrics["train_runtime"], 1),
        "first_step_time_s": round(recorder.durations[0], 2) if recorder.durations else None,
        "median_step_time_s": round(statistics.median(step_times), 2) if step_times else None,
        "tokens_per_step": training_args.per_device_train_batch_size * args.block_size
        * training_args.gradient_accumulation_steps * trainer.args.world_size,
        "memory_per_rank": memory_per_rank,
        "optimizer": str(training_args.optim).split(".")[-1].lower(),
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(training_args.lr_scheduler_type).split(".")[-1].lower(),
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "streamed_regions": bool(training_args.activation_checkpointing),
        "engine_max_live_parameters": getattr(
            getattr(getattr(engine, "_config", None), "zero_config", None),
            "max_live_parameters", None),
        "torch_threads": torch.get_num_threads(),
        **distributed_info(trainer),
    }


def exit_together() -> None:
    """Leave every rank at once; gloo aborts a process whose peer is gone mid-shutdown."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads may still hold tensors then, and
    # freeing them aborts the process (https://github.com/pytorch/pytorch/pull/179291).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
