"""Export a DeepSpeed ZeRO checkpoint as one consolidated `transformers` checkpoint.

Under ZeRO-3 (and ZeRO-2) the Trainer saves every rank's shard of the parameters and optimizer
state, not a model that `from_pretrained` can load. `export_zero_checkpoint` rebuilds the full
fp32 state from those shards, in one process and without the processes that trained, and writes
it as safetensors beside the checkpoint's `config.json` (which carries the SAL settings).

It reads the fp32 master weights that DeepSpeed keeps in the optimizer shards, through
DeepSpeed's own `zero_to_fp32` reader: after bf16 or fp16 training they are the weights the
optimizer holds, not a 16-bit rounding of them, and the checkpoint need not have been saved with
`stage3_gather_16bit_weights_on_model_save`.
Persistent buffers (the routers' running means) come from the model-state shards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

import torch

__all__ = ["export_zero_checkpoint", "is_zero_checkpoint"]

logger = logging.getLogger(__name__)

# Files of a Trainer checkpoint that describe training, not the model; never exported.
_TRAINING_FILES = (
    "latest",
    "zero_to_*.py",
    "trainer_state.json",
    "training_args.bin",
    "rng_state*.pth",
    "scheduler.pt",
    "optimizer.pt",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def is_zero_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when `checkpoint_dir` holds DeepSpeed ZeRO shards (it has a `latest` tag file)."""
    return (Path(checkpoint_dir) / "latest").is_file()


def _resolve_tag(checkpoint_dir: Path, tag: str | None) -> str:
    if tag is None:
        if not is_zero_checkpoint(checkpoint_dir):
            raise FileNotFoundError(
                f"{checkpoint_dir} is not a DeepSpeed ZeRO checkpoint: it has no `latest` file. "
                "Pass the checkpoint-N folder the Trainer saved under DeepSpeed, or `tag=` naming "
                "its global_stepN folder."
            )
        tag = (checkpoint_dir / "latest").read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no shard folder {tag!r}; the tags present are "
            f"{sorted(p.name for p in checkpoint_dir.glob('global_step*'))}."
        )
    return tag


def _load_fp32_state(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise ImportError(
            "Exporting a ZeRO checkpoint needs DeepSpeed: pip install 'sal-hf[deepspeed]'."
        ) from error
    # DeepSpeed's reader prints its progress; keep it for the debug log instead of stdout.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    logger.debug("zero_to_fp32: %s", printed.getvalue().strip())
    return state


def _for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tensor per name, each owning its storage, as safetensors requires.

    Tied parameters come back from DeepSpeed as one tensor under several names: only the first
    name is kept, as `save_pretrained` does, and loading ties the others again. ZeRO-2 returns
    every parameter as a view of one flat vector: those views are copied out.
    """
    seen_tensors: dict[tuple, str] = {}
    seen_storages: set[int] = set()
    result = {}
    for name, tensor in state.items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in seen_tensors:
            logger.debug("%s is tied to %s: stored once.", name, seen_tensors[identity])
            continue
        seen_tensors[identity] = name
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen_storages or storage.nbytes() != tensor.nbytes
        result[name] = tensor.clone() if shared else tensor
        seen_storages.add(storage.data_ptr())
    return result


def _copy_model_files(checkpoint_dir: Path, output_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer and processor files; skip training state."""
    copied = []
    for path in sorted(checkpoint_dir.iterdir()):
        if not path.is_file() or any(fnmatch(path.name, p) for p in _TRAINING_FILES):
            continue
        shutil.copy2(path, output_dir / path.name)
        copied.append(path.name)
    return copied


def export_zero_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tag: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a ZeRO checkpoint as a `from_pretrained`-loadable folder with safetensors weights.

    Args:
        checkpoint_dir: a `checkpoint-N` folder saved by the (SAL) Trainer under DeepSpeed
            ZeRO-2 or ZeRO-3: `config.json`, `latest` and the `global_stepN` shard folder.
        output_dir: the folder to write (created if missing); must not be `checkpoint_dir`.
        tag: the shard folder to read; defaults to the one named in `latest`.
        max_shard_size: weights larger than this are split into several safetensors files with
            an index, as `save_pretrained` does; below it (the usual case) one `model.safetensors`.

    Returns:
        The output folder. It holds every parameter and persistent buffer in fp32 under the
        model's own state-dict names (tied weights once), as
        `save_pretrained(folder, save_original_format=False)` writes them, plus the
        checkpoint's config and tokenizer files. `sal_hf.checkpoint`'s `AutoSAL*` classes
        load it.

    Raises:
        FileNotFoundError: `checkpoint_dir` is not a ZeRO checkpoint or has no `config.json`.
        ValueError: `output_dir` is `checkpoint_dir`.
        ImportError: DeepSpeed is not installed.
    """
    from huggingface_hub import save_torch_state_dict

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no config.json; export a checkpoint-N folder written by the "
            "Trainer (it saves the model config beside the ZeRO shards)."
        )
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(
            f"output_dir is the checkpoint folder itself ({checkpoint_dir}); choose a new folder "
            "so the training checkpoint stays resumable."
        )
    tag = _resolve_tag(checkpoint_dir, tag)
    state = _for_safetensors(_load_fp32_state(checkpoint_dir, tag))

    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(
        state, output_dir, max_shard_size=max_shard_size, metadata={"format": "pt"}
    )
    copied = _copy_model_files(checkpoint_dir, output_dir)
    logger.info(
        "Exported %s (%s): %d tensors, %.1fM values, to %s with %s.",
        checkpoint_dir, tag, len(state), sum(t.numel() for t in state.values()) / 1e6,
        output_dir, ", ".join(copied),
    )
    return output_dir
