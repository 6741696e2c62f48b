"""Train a GPT-2 or Llama language model from scratch with SAL, DFA or backprop.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/train_causal_lm.py \
        --arch gpt2 --num_layers 6 --hidden_size 256 --corpus shakespeare \
        --method sal --num_areas 4 --routing token --output_dir outputs/shakespeare-sal4

No pretrained tokenizer exists offline, so one is trained on the training text: byte-level BPE
(`--tokenizer bpe`, `--vocab_size` 8192, deterministic) or characters (`--tokenizer char`). It is
saved with the model. The corpus is cut into blocks of `--block_size` tokens; the validation set
is the corpus's contiguous end. Writes `results.json` (eval loss and perplexity, tokens per
second, peak memory, area usage), `learning_curves.png` and the SAL checkpoint.

Every `TrainingArguments` option is accepted; the defaults are the tuned recipe.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)

from sal_hf import SALConfig, convert_to_sal, parameter_counts
from sal_hf.data import CORPORA, load_corpus, split_corpus
from sal_hf.reporting import (
    PeakMemory,
    StepTimer,
    distributed_info,
    plot_learning_curves,
    quiet_deprecated_collectives,
    write_results,
)
from sal_hf.trainer import SALTrainer, SALTrainingArguments, area_learning_rate_scale

logger = logging.getLogger("train_causal_lm")

ARCHITECTURES = ("gpt2", "llama")
TOKENIZERS = ("bpe", "char")
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
# SAL-4 with token routing is the setting benchmarked in docs/results.md.
SAL_DEFAULT_AREAS = 4

TUNED_DEFAULTS = dict(
    # From short runs (100-150 steps of 8 x 128 tokens) of the 6-layer, d_model 256 GPT-2 on
    # Shakespeare: BP did best at 3e-3 of 1e-3, 2e-3, 3e-3; SAL at 3e-3 of 1e-3, 3e-3, 6e-3.
    learning_rate=3e-3,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    max_steps=2000,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    weight_decay=0.1,
    adam_beta2=0.99,
    max_grad_norm=1.0,
    eval_strategy="steps",
    eval_steps=0.25,
    prediction_loss_only=True,  # the logits of a whole validation set would not fit in memory
    save_strategy="no",
    logging_steps=20,
    report_to="none",
    seed=0,
)


@dataclass
class CausalLMArguments:
    arch: str = field(default="gpt2", metadata={"help": f"One of {ARCHITECTURES}."})
    num_layers: int = field(default=6, metadata={"help": "Number of transformer blocks."})
    hidden_size: int = field(default=256, metadata={"help": "Model width (d_model)."})
    num_heads: int = field(default=8, metadata={"help": "Attention heads per block."})
    intermediate_size: int | None = field(
        default=None,
        metadata={"help": "MLP width (default: 4 x hidden for gpt2, ~8/3 x hidden for llama)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout of every layer (gpt2)."})
    corpus: str = field(default="shakespeare", metadata={"help": f"One of {CORPORA}."})
    tokenizer: str = field(default="bpe", metadata={"help": f"One of {TOKENIZERS}."})
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Share of the corpus, from its end, that validates."}
    )
    method: str = field(default="sal", metadata={"help": "sal, dfa or bp."})
    num_areas: int | None = field(
        default=None,
        metadata={"help": "Areas per MLP layer (default: 4 for sal, the benchmarked setting; "
                  "1 otherwise)."},
    )
    routing: str = field(default="token", metadata={"help": "'token' or 'sample' routing."})
    feedback: str = field(default="region", metadata={"help": "'region' or 'area' feedback."})
    feedback_rank: int | None = field(
        default=None, metadata={"help": "Rank of compressed feedback (auto above 1024 outputs)."}
    )
    feedback_blocks: int | None = field(
        default=None,
        metadata={"help": "Diagonal blocks of the compressed feedback (default: 1 with "
                  "--feedback_rank, else chosen with the rank)."},
    )
    feedback_scale: float = field(default=1.0, metadata={"help": "Scale of feedback matrices."})
    routing_dim: int = field(default=32, metadata={"help": "Width of the routing space."})
    shared_path: bool = field(default=False, metadata={"help": "Add an always-on dense path."})
    sal_seed: int = field(default=0, metadata={"help": "Seed of prototypes and feedback."})
    limit: int | None = field(
        default=None, metadata={"help": "Use only the first N characters of the corpus (tests)."}
    )


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((CausalLMArguments, SALTrainingArguments))
    parser.set_defaults(**TUNED_DEFAULTS)
    args, training_args = parser.parse_args_into_dataclasses(argv)
    for name, value, allowed in (
        ("arch", args.arch, ARCHITECTURES),
        ("corpus", args.corpus, CORPORA),
        ("tokenizer", args.tokenizer, TOKENIZERS),
    ):
        if value not in allowed:
            parser.error(f"--{name} {value!r} is unknown; use one of {allowed}.")
    if args.block_size < 2:
        parser.error(f"--block_size must be at least 2, got {args.block_size}.")
    return args, training_args


def train_tokenizer(text: str, kind: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer trained on `text` alone: byte-level BPE, or one token per character.

    BPE training is deterministic for a given text and vocabulary size, so every method of a
    comparison sees the same tokens.
    """
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
        )

    # Characters never seen in training (only in validation) become <unk>.
    vocabulary = {token: index for index, token in enumerate([END_OF_TEXT, UNKNOWN])}
    for character in sorted(set(text)):
        vocabulary[character] = len(vocabulary)
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
        unk_token=UNKNOWN,
    )


def to_blocks(text: str, tokenizer: PreTrainedTokenizerFast, block_size: int) -> datasets.Dataset:
    """`text` tokenized and cut into consecutive blocks of `block_size` tokens (the last partial
    block is dropped). Labels are the inputs: the model shifts them itself."""
    lines = text.splitlines(keepends=True)
    encoded = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    ids = np.fromiter((i for line in encoded for i in line.ids), dtype=np.int64)
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"The text gives {len(ids)} tokens, fewer than one block of {block_size}; use a "
            "smaller --block_size or a larger --limit."
        )
    blocks = ids[: num_blocks * block_size].reshape(num_blocks, block_size)
    dataset = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    return dataset.with_format("torch")


def build_model(args: CausalLMArguments, tokenizer: PreTrainedTokenizerFast):
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id
    if args.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=args.block_size, n_embd=args.hidden_size,
            n_layer=args.num_layers, n_head=args.num_heads, n_inner=args.intermediate_size,
            resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        )
        model = GPT2LMHeadModel(config)
    else:
        intermediate = args.intermediate_size or 64 * math.ceil(8 * args.hidden_size / 3 / 64)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=intermediate,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
            max_position_embeddings=args.block_size, bos_token_id=eos, eos_token_id=eos,
            pad_token_id=eos,
        )
        model = LlamaForCausalLM(config)
    num_areas = args.num_areas
    if num_areas is None and args.method == "sal":
        num_areas = SAL_DEFAULT_AREAS
    sal_config = SALConfig(
        method=args.method, num_areas=num_areas, routing=args.routing,
        feedback=args.feedback, feedback_rank=args.feedback_rank,
        feedback_blocks=args.feedback_blocks, feedback_scale=args.feedback_scale,
        routing_dim=args.routing_dim,
        shared_path=args.shared_path, seed=args.sal_seed,
    )
    return convert_to_sal(model, sal_config)


def final_evaluation(trainer: SALTrainer) -> dict[str, float]:
    """The validation metrics after training; reused when the last step was just evaluated."""
    history = trainer.state.log_history
    last = next((entry for entry in reversed(history) if "eval_loss" in entry), None)
    if last is not None and last["step"] == trainer.state.global_step:
        return last
    return trainer.evaluate()


def main(argv: list[str] | None = None) -> dict:
    quiet_deprecated_collectives()
    args, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    text = load_corpus(args.corpus)[: args.limit]
    train_text, validation_text = split_corpus(text, args.validation_fraction)
    tokenizer = train_tokenizer(train_text, args.tokenizer, args.vocab_size)
    train_blocks = to_blocks(train_text, tokenizer, args.block_size)
    validation_blocks = to_blocks(validation_text, tokenizer, args.block_size)
    logger.info("%d training and %d validation blocks of %d tokens, vocabulary %d.",
                len(train_blocks), len(validation_blocks), args.block_size, len(tokenizer))

    model = build_model(args, tokenizer)
    timer = StepTimer()
    trainer = SALTrainer(
        model=model, args=training_args, train_dataset=train_blocks,
        eval_dataset=validation_blocks, processing_class=tokenizer, callbacks=[timer],
        data_collator=default_data_collator,  # blocks are all the same length: nothing to pad
        # Token-level accuracy is not a language-model metric: report the loss only.
        preprocess_logits_for_metrics=None,
    )
    with PeakMemory() as memory:
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    eval_metrics = final_evaluation(trainer)
    results = collect_results(args, training_args, trainer, train_output, eval_metrics, memory,
                              timer, num_train_blocks=len(train_blocks))
    if trainer.is_world_process_zero():
        finish(trainer, results, Path(training_args.output_dir), args)
    return results


def collect_results(args, training_args, trainer, train_output, eval_metrics, memory, timer,
                    num_train_blocks: int) -> dict:
    sequences_per_step = (training_args.per_device_train_batch_size
                          * training_args.gradient_accumulation_steps * trainer.args.world_size)
    tokens_per_step = sequences_per_step * args.block_size
    step_time = sum(timer.durations) / max(len(timer.durations), 1)
    counts = parameter_counts(trainer.model)
    sal_config = trainer.sal_controller.sal_config
    return {
        "arch": args.arch, "corpus": args.corpus, "tokenizer": args.tokenizer,
        "vocab_size": trainer.model.config.vocab_size, "block_size": args.block_size,
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "method": args.method, "num_areas": sal_config.num_areas, "routing": sal_config.routing,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(eval_metrics["eval_loss"]),
        "global_steps": train_output.global_step,
        "train_tokens": train_output.global_step * tokens_per_step,
        "epochs": train_output.global_step * sequences_per_step / num_train_blocks,
        "train_runtime_s": round(train_output.metrics["train_runtime"], 2),
        "step_time_ms": round(1000 * step_time, 3),
        "median_step_time_ms": round(1000 * statistics.median(timer.durations or [0.0]), 3),
        "tokens_per_second": round(tokens_per_step / step_time, 1) if step_time else None,
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


def finish(trainer, results: dict, output_dir: Path, args: CausalLMArguments) -> None:
    label = f"SAL-{results['num_areas']}" if args.method == "sal" else args.method.upper()
    plot = plot_learning_curves(
        {label: trainer.state.log_history}, output_dir / "learning_curves.png",
        metric_key="eval_loss", title=f"{args.arch} on {args.corpus}: {label}",
    )
    results["learning_curves"] = plot.name
    trainer.save_model(str(output_dir))  # the tokenizer is saved with it
    trainer.save_state()
    write_results(output_dir / "results.json", results)
    summary = {k: results[k] for k in ("eval_perplexity", "tokens_per_second", "peak_memory_mb")}
    logger.info("Results in %s: %s", output_dir / "results.json", summary)


if __name__ == "__main__":
    main(sys.argv[1:])
