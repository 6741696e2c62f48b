"""Checkpoints: load SAL models saved by `save_pretrained`, and prepare them for the Hub.

A SAL checkpoint is what `transformers`' own `model.save_pretrained(folder)` writes for a
converted model: `config.json` (the base model's config plus `sal_config` and
`sal_architecture`) and `model.safetensors` (or shards with `model.safetensors.index.json`).
The weights differ from the base model's: area layers are `[num_areas, out, in]` and the routers
under `sal_controller` add their projections and running means. Prototypes and feedback matrices
are not saved: they are regenerated from the seed in `sal_config`.

`save_pretrained` writes some architectures under older key names than their modules have (a
ViT's `vit.layers.0.mlp.fc1` as `vit.encoder.layer.0.intermediate.dense`): transformers' conversion
mapping renames them on save and back on load. Loading here applies the same mapping, through
transformers' own functions, so a checkpoint loads under the names `from_pretrained` would give it.

The `AutoSALModelFor*` classes rebuild such a model: the base architecture from its config,
`convert_to_sal` with the saved settings, then the weights, checked in full before any of them
is loaded. Loading never unpickles: `.bin`/`.pt` weights are refused.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCardData, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    conversion_mapping,
)

# Limitation: `core_model_loading` is internal to transformers (what its `from_pretrained` and
# `save_pretrained` use to rename keys); a transformers release may move these names.
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    WeightTransform,
    dot_natural_key,
    rename_source_key,
)

from . import models  # noqa: F401  (registers the model families' configs with AutoConfig)
from .areas import AreaLinear
from .config import SALConfig
from .conversion import convert_to_sal
from .regions import get_controller

__all__ = [
    "AutoSALModelForCausalLM",
    "AutoSALModelForImageClassification",
    "AutoSALModelForSequenceClassification",
    "SALCheckpointError",
    "parameter_counts",
    "prepare_for_hub",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_CARD_NAME = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a Hub snapshot needs for loading; pickled weights are never downloaded.
_HUB_PATTERNS = ["*.json", "*.safetensors"]
# How many offending keys an error message lists.
_SHOWN = 5


class SALCheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a SAL model; the message says why and what to do."""


def _resolve_folder(
    path_or_repo_id: str | os.PathLike,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    token: str | bool | None,
) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a Hub snapshot of the repo.

    Repo ids resolve through `huggingface_hub.snapshot_download`, so its cache, `revision`,
    `HF_HUB_OFFLINE` and `local_files_only` behave as everywhere else in the HF ecosystem.
    """
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    try:
        folder = snapshot_download(
            str(path_or_repo_id),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            token=token,
            allow_patterns=_HUB_PATTERNS,
        )
    except (HFValidationError, LocalEntryNotFoundError) as error:
        raise SALCheckpointError(
            f"{str(path_or_repo_id)!r} is neither a local folder nor a Hub repository that could "
            f"be resolved ({type(error).__name__}: {error}). Pass the folder that save_pretrained "
            "wrote, or a repo id that is cached (offline) or reachable."
        ) from error
    return Path(folder)


def _load_config(folder: Path) -> PreTrainedConfig:
    if not (folder / CONFIG_NAME).is_file():
        raise SALCheckpointError(
            f"{folder} has no {CONFIG_NAME}; a SAL checkpoint is the folder written by "
            "model.save_pretrained(folder) for a model converted with sal_hf.convert_to_sal."
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - unreadable JSON, no or unknown model_type, a
        # file that is not a JSON object, a value the config class's own checks refuse.
        raise SALCheckpointError(f"{folder / CONFIG_NAME} cannot be read: {error}") from error
    if not isinstance(getattr(config, "sal_config", None), Mapping):
        raise SALCheckpointError(
            f"{folder} is not a SAL checkpoint: its {CONFIG_NAME} has no 'sal_config'. Load the "
            "base model with transformers and call sal_hf.convert_to_sal(model, SALConfig(...))."
        )
    return config


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in `folder`, one or the shards of the index."""
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        names = _shard_names(folder / WEIGHTS_INDEX_NAME)
        absent = [name for name in names if not (folder / name).is_file()]
        if absent:
            raise SALCheckpointError(
                f"{folder / WEIGHTS_INDEX_NAME} names shards {absent} that are not in {folder}: "
                "the checkpoint is incomplete. Copy or download every shard again."
            )
        return [folder / name for name in names]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise SALCheckpointError(
            f"{folder} holds only pickled weights {pickled}. sal_hf never unpickles (a pickle can "
            f"run arbitrary code). Load it once where you trust it and re-save as safetensors: "
            f"model.save_pretrained(folder) writes {WEIGHTS_NAME}."
        )
    raise SALCheckpointError(
        f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}; files there: "
        f"{sorted(p.name for p in folder.iterdir())}. Pickled weights (.bin, .pt) are never "
        "downloaded or loaded: save the model with save_pretrained, which writes safetensors."
    )


def _shard_names(index_file: Path) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SALCheckpointError(
            f"{index_file} is not a valid safetensors index ({type(error).__name__}: {error}); "
            "it must map every key to its shard under 'weight_map'. Save the model again."
        ) from error
    if not names:
        raise SALCheckpointError(f"{index_file} lists no shards. Save the model again.")
    return names


def _read_weights(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of `files` on the CPU, and the file each key came from."""
    state_dict: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in files:
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as error:
            raise SALCheckpointError(
                f"{file} is not a readable safetensors file ({error}); it is probably truncated "
                "or corrupt. Download or save it again."
            ) from error
        repeated = sorted(set(tensors) & set(state_dict))
        if repeated:
            raise SALCheckpointError(
                f"{file} repeats keys {repeated[:_SHOWN]} of another shard: the shards do not "
                "belong to one checkpoint. Download or save it again."
            )
        state_dict.update(tensors)
        origin.update(dict.fromkeys(tensors, file.name))
    return state_dict, origin


def _area_parameter_names(model: nn.Module) -> set[str]:
    """The state-dict keys of the area layers' stacked `[num_areas, ...]` parameters."""
    return {
        f"{name}.{parameter_name}"
        for name, module in model.named_modules()
        if isinstance(module, AreaLinear)
        for parameter_name, _ in module.named_parameters(recurse=False)
    }


def _to_model_names(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint's tensors under the model's state-dict keys, and where each came from.

    Each key goes through transformers' conversion mapping as in `from_pretrained`: every
    renaming, then at most one converter. A key the model already has is kept when renaming
    would lose it (weights saved with `save_original_format=False`). Keys that fit no parameter
    keep their (renamed) key and are reported by `_weight_problems`.
    """
    transforms = conversion_mapping.get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix, expected = model.base_model_prefix, model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    pending: dict[str, WeightConverter] = {}
    for key in sorted(state_dict, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:
            name, pattern = rename_source_key(key, [], [], prefix, expected)
        if pattern is not None and name in expected:
            converter = pending.setdefault(name, copy.deepcopy(by_pattern[pattern]))
            converter.add_tensor(name, key, pattern, state_dict[key])
            continue
        saved_as = origin[key] if name == key else f"{origin[key]} (as {key!r})"
        _place(tensors, where, name, state_dict[key], saved_as)

    area_names = _area_parameter_names(model)
    for name, converter in pending.items():
        sources = sorted(set().union(*converter.layer_targets.values()))
        saved_as = f"{origin[sources[0]]} (as {', '.join(map(repr, sources))})"
        for target, tensor in _convert(model, name, converter, sources, area_names).items():
            _place(tensors, where, target, tensor, saved_as)
    # As `from_pretrained` does: `save_pretrained` then reverses the transforms used here.
    model._weight_conversions = [t for t in transforms if t.was_used()]
    return tensors, where


def _place(
    tensors: dict[str, torch.Tensor],
    where: dict[str, str],
    name: str,
    tensor: torch.Tensor,
    saved_as: str,
) -> None:
    if name in tensors:
        raise SALCheckpointError(
            f"{where[name]} and {saved_as} both load into {name!r}: the checkpoint holds that "
            "weight twice, under two names. Save the model again."
        )
    tensors[name] = tensor
    where[name] = saved_as


def _convert(
    model: nn.Module,
    name: str,
    converter: WeightConverter,
    sources: list[str],
    area_names: set[str],
) -> dict[str, torch.Tensor]:
    """Apply one of transformers' converters (a fuse, split or transpose) to the checkpoint
    tensors `sources` it collected for `name`; refused where it would produce area weights."""
    operations = ", ".join(type(operation).__name__ for operation in converter.operations)
    if name in area_names:
        raise _area_conversion_error(model, sources, [name], operations)
    try:
        converted = converter.convert(name, model=model, config=model.config)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as error:
        raise SALCheckpointError(
            f"transformers' conversion ({operations}) of {sources[:_SHOWN]} into {name!r} failed "
            f"({type(error).__name__}: {error}). Save the model again, with "
            "model.save_pretrained(folder, save_original_format=False)."
        ) from error
    tensors = {key: t[0] if isinstance(t, list) else t for key, t in converted.items()}
    touched = sorted(set(tensors) & area_names)
    if touched:
        raise _area_conversion_error(model, sources, touched, operations)
    return tensors


def _area_conversion_error(
    model: nn.Module, sources: list[str], targets: list[str], operations: str
) -> SALCheckpointError:
    return SALCheckpointError(
        f"transformers' conversion mapping for {type(model).__name__} loads {sources[:_SHOWN]} "
        f"into the area weights {targets[:_SHOWN]} through {operations}. Those operations are "
        "written for one layer's [out, in] weight; an area weight is [num_areas, out, in], whose "
        "first dimension they would treat as features, so sal_hf does not apply them. Save the "
        "SAL model with model.save_pretrained(folder, save_original_format=False), which writes "
        "every weight unconverted under its module name (prepare_for_hub does so for such "
        "models), and load that folder."
    )


def _saving_converts_area_weights(model: nn.Module) -> bool:
    """Whether `save_pretrained` in its default (original) format would pass an area weight
    through one of transformers' converters, writing a checkpoint `_convert` refuses."""
    transforms: list[WeightTransform] | None = getattr(model, "_weight_conversions", None)
    if transforms is None:
        transforms = conversion_mapping.get_model_conversion_mapping(model, add_legacy=False)
    # On save, converters see the model's own keys, before any renaming.
    reversed_converters = [
        t.reverse_transform() for t in transforms if isinstance(t, WeightConverter)
    ]
    return any(
        converter.rename_source_key(name)[1] is not None
        for converter in reversed_converters
        for name in _area_parameter_names(model)
    )


def _alias_groups(model: nn.Module) -> dict[str, set[str]]:
    """For each state-dict key, the keys naming the same tensor (tied weights, shared modules)."""
    by_tensor: dict[int, set[str]] = {}
    tensors = model.state_dict(keep_vars=True)
    for key, tensor in tensors.items():
        by_tensor.setdefault(id(tensor), set()).add(key)
    return {key: by_tensor[id(tensor)] for key, tensor in tensors.items()}


def _weight_problems(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: Mapping[str, str]
) -> list[str]:
    """What keeps `state_dict` from loading strictly into `model`, one line per kind."""
    expected = model.state_dict()
    groups = _alias_groups(model)
    # A tied weight (GPT-2's lm_head.weight) may be absent when the tensor it shares is present.
    missing = sorted(k for k in expected if not groups[k] & state_dict.keys())
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key!r} is {list(state_dict[key].shape)} in {origin[key]} but the config gives "
        f"{list(expected[key].shape)}"
        for key in sorted(set(state_dict) & set(expected))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {'; '.join(mismatched[:_SHOWN])}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:_SHOWN]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:_SHOWN]}")
    return problems


def _load_checked(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    origin: Mapping[str, str],
    folder: Path,
    keep_saved_dtypes: bool,
) -> None:
    """Load `state_dict` into `model` if and only if every key and shape matches.

    With `keep_saved_dtypes` the saved tensors become the model's (each keeps its saved dtype);
    otherwise they are copied into the model's tensors, cast to their dtype.
    """
    problems = _weight_problems(model, state_dict, origin)
    if problems:
        raise SALCheckpointError(
            f"The weights in {folder} do not fit the model its {CONFIG_NAME} describes; the "
            f"config and the weights disagree: {' | '.join(problems)}. Restore the "
            f"{CONFIG_NAME} saved with these weights, or save the model again."
        )
    if keep_saved_dtypes:
        # The tensors become the parameters: give each its own allocation. Views into the file's
        # buffer keep the whole buffer alive and sit at the file's 8-byte offsets, where BLAS
        # takes other code paths than on the allocator's aligned memory and rounds differently.
        state_dict = {name: tensor.clone() for name, tensor in state_dict.items()}
    # Not strict only because tied keys may be absent; everything else was checked above.
    model.load_state_dict(state_dict, strict=False, assign=keep_saved_dtypes)


def _model_class_or_none(auto_class: type, config: PreTrainedConfig) -> type | None:
    """The class `auto_class` builds for `config`, if it is the one the config was saved from."""
    mapping = auto_class._model_mapping
    if type(config) not in mapping:
        return None
    candidates = mapping[type(config)]
    if not isinstance(candidates, (list, tuple)):
        candidates = (candidates,)
    saved = list(getattr(config, "architectures", None) or [])
    if not saved:
        return candidates[0]
    return next((c for c in candidates if c.__name__ in saved), None)


def _build_sal_model(
    auto_class: type, config: PreTrainedConfig, dtype: torch.dtype | None, folder: Path
) -> nn.Module:
    """The base model of `config`, freshly initialised, converted with its saved SAL settings."""
    try:
        sal_config = SALConfig.from_dict(dict(config.sal_config))
    except (TypeError, ValueError) as error:
        raise SALCheckpointError(
            f"The sal_config in {folder / CONFIG_NAME} is invalid: {error}"
        ) from error
    saved_architecture = getattr(config, "sal_architecture", None)
    kwargs = {} if dtype is None else {"dtype": dtype}
    # Limitation: the base model is initialised at random before the weights replace its
    # values; for very large models that costs time and one extra copy of the weights.
    try:
        model = auto_class.from_config(config, trust_remote_code=False, **kwargs)
        convert_to_sal(model, sal_config)
    except SALCheckpointError:
        raise
    except Exception as error:  # transformers' config checks raise many types; all mean the same
        raise SALCheckpointError(
            f"The model that {folder / CONFIG_NAME} describes cannot be built: "
            f"{type(error).__name__}: {error}"
        ) from error
    if saved_architecture is not None and model.config.sal_architecture != saved_architecture:
        raise SALCheckpointError(
            f"{folder} was saved from a SAL model of architecture {saved_architecture!r}, but "
            f"{type(model).__name__} converts as {model.config.sal_architecture!r}. Load it with "
            "the sal_hf version that saved it."
        )
    return model


def _finish(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    # Tied weights absent from the file (GPT-2's lm_head) point at their source again.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if device is not None:
        model.to(device)
    # Prototypes and feedback matrices are not in the weights: regenerate them on the device.
    get_controller(model).reset_frozen_buffers()
    return model.eval()


class _AutoSALModel:
    """Shared `from_pretrained` of the `AutoSALModelFor*` classes."""

    _auto_class: type
    _pipeline_tag: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is not instantiated; use "
            f"{type(self).__name__}.from_pretrained(path_or_repo_id)."
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Rebuild a SAL model saved by `save_pretrained`, from a folder or a Hub repo id.

        Args:
            path_or_repo_id: a folder written by `model.save_pretrained`, or a Hub repo id
                (`"org/name"`), resolved through the Hugging Face cache (`HF_HUB_OFFLINE=1`
                resolves from the cache alone).
            revision: branch, tag or commit of a Hub repo; its default branch when unset.
            cache_dir: the Hugging Face cache to use instead of the default one.
            local_files_only: resolve a repo id from the cache only, never the network.
            token: Hub token for private repositories (see `huggingface_hub`).
            device: where to put the model; the CPU when unset.
            dtype: cast the base model's weights to this dtype (routers stay float32, as
                `convert_to_sal` makes them). Unset, every tensor keeps the dtype it was saved in.

        Returns:
            The SAL model in eval mode, every weight loaded; prototypes and feedback matrices
            regenerated from the saved seed.

        Raises:
            SALCheckpointError: the checkpoint is not a SAL checkpoint, is pickled, truncated or
                corrupt, does not match its config, or is not a model this class builds. Nothing
                is returned half loaded.
        """
        folder = _resolve_folder(path_or_repo_id, revision, cache_dir, local_files_only, token)
        config = _load_config(folder)
        cls._check_builds(config, folder)
        state_dict, origin = _read_weights(_weight_files(folder))
        model = _build_sal_model(cls._auto_class, config, dtype, folder)
        state_dict, origin = _to_model_names(model, state_dict, origin)
        _load_checked(model, state_dict, origin, folder, keep_saved_dtypes=dtype is None)
        logger.info("Loaded SAL %s from %s.", type(model).__name__, folder)
        return _finish(model, device)

    @classmethod
    def _check_builds(cls, config: PreTrainedConfig, folder: Path) -> None:
        if _model_class_or_none(cls._auto_class, config) is not None:
            return
        saved = getattr(config, "architectures", None) or [config.model_type]
        fitting = [
            other.__name__
            for other in _SAL_AUTO_CLASSES
            if _model_class_or_none(other._auto_class, config) is not None
        ]
        advice = f"use {' or '.join(fitting)}" if fitting else "no AutoSAL class builds it"
        raise SALCheckpointError(
            f"{folder} holds a {saved[0]} (model_type {config.model_type!r}), which "
            f"{cls.__name__} does not build: {advice}."
        )


class AutoSALModelForCausalLM(_AutoSALModel):
    """Loads SAL causal language models (`AutoModelForCausalLM` architectures)."""

    _auto_class = AutoModelForCausalLM
    _pipeline_tag = "text-generation"


class AutoSALModelForSequenceClassification(_AutoSALModel):
    """Loads SAL sequence classifiers (`AutoModelForSequenceClassification` architectures)."""

    _auto_class = AutoModelForSequenceClassification
    _pipeline_tag = "text-classification"


class AutoSALModelForImageClassification(_AutoSALModel):
    """Loads SAL image classifiers (`AutoModelForImageClassification` architectures, and the
    MLP family's `MLPForImageClassification`)."""

    _auto_class = AutoModelForImageClassification
    _pipeline_tag = "image-classification"


_SAL_AUTO_CLASSES: tuple[type[_AutoSALModel], ...] = (
    AutoSALModelForCausalLM,
    AutoSALModelForSequenceClassification,
    AutoSALModelForImageClassification,
)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """`total` parameters of a SAL model, and those `active` for one sample (or one token with
    per-token routing): of each area layer only one area computes."""
    total = sum(parameter.numel() for parameter in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, AreaLinear):
            per_area = module.weight[0].numel()
            per_area += module.bias[0].numel() if module.bias is not None else 0
            inactive += per_area * (module.num_areas - 1)
    return {"total": total, "active": total - inactive}


def _sal_class_for(model: nn.Module) -> type[_AutoSALModel] | None:
    return next(
        (
            sal_class
            for sal_class in _SAL_AUTO_CLASSES
            if _model_class_or_none(sal_class._auto_class, model.config) is type(model)
        ),
        None,
    )


def _require_sal_model(model: nn.Module) -> None:
    if get_controller(model) is None or not hasattr(model, "config"):
        raise ValueError(
            f"{type(model).__name__} is not a SAL model; convert it first with "
            "sal_hf.convert_to_sal(model, SALConfig(...))."
        )


def _card_sections(model: nn.Module, load_from: str) -> list[str]:
    config = model.config
    sal_config = dict(config.sal_config)
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    counts = parameter_counts(model)
    unit = "token" if sal_config["routing"] == "token" else "sample"
    sal_class = _sal_class_for(model)
    settings = "\n".join(
        f"| `{name}` | `{json.dumps(value)}` |" for name, value in sorted(sal_config.items())
    )
    if sal_class is None:
        loading = f"No AutoSAL class builds `{architecture}`; rebuild it with `convert_to_sal`."
    else:
        loading = (
            f"```python\nfrom sal_hf import {sal_class.__name__}\n\n"
            f'model = {sal_class.__name__}.from_pretrained("{load_from}")\n```'
        )
    return [
        f"# SAL {architecture}",
        f"`{architecture}` (model type `{config.model_type}`) converted by sal-hf to SAL "
        "(Selective Adaptive Learning), which trains without end-to-end backpropagation. "
        f"SAL handler: `{config.sal_architecture}`.",
        "## Parameters\n\n| | count |\n|---|---|\n"
        f"| total | {counts['total']:,} |\n| active per {unit} | {counts['active']:,} |\n\n"
        f"Each area layer stores {sal_config['num_areas']} areas; one {unit} uses one of them.",
        f"## SAL settings\n\n| setting | value |\n|---|---|\n{settings}",
        f"## Loading\n\n{loading}\n\nLoad it with sal-hf: plain `transformers` builds the dense "
        "base model, whose shapes differ. Prototypes and feedback matrices are not in the "
        f"weights; they are regenerated from the seed `{sal_config['seed']}`.",
    ]


def write_model_card(
    model: nn.Module, folder: str | os.PathLike, *, repo_id: str | None = None
) -> Path:
    """Write `folder/README.md`, the model card of a SAL model, and return its path.

    The card names the base architecture, lists every SAL setting and the parameter counts
    (total, and active per sample or token), and shows how to load the model with sal_hf.
    `repo_id` is the name the loading snippet uses; the folder's path when unset.
    """
    _require_sal_model(model)
    sal_class = _sal_class_for(model)
    data = ModelCardData(
        library_name="sal-hf",
        pipeline_tag=sal_class._pipeline_tag if sal_class is not None else None,
        tags=["sal", "selective-adaptive-learning", "backprop-free"],
    )
    sections = _card_sections(model, repo_id or str(folder))
    path = Path(folder) / MODEL_CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    return path


def prepare_for_hub(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save a SAL model and its model card into `folder`, ready to upload as a Hub repo.

    `model.save_pretrained(folder, **save_kwargs)` writes `config.json` (with `sal_config`) and
    safetensors weights; `write_model_card` adds `README.md`. Pushing is then uploading the
    folder, e.g. `huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder)`.
    `model.push_to_hub(repo_id)` uploads the same config and weights; it keeps a README already
    in the repo, and otherwise writes transformers' generic card instead of this one.
    Where transformers' conversion mapping would reshape area weights on save, the weights are
    saved unconverted (`save_original_format=False`) unless `save_kwargs` says otherwise.
    """
    _require_sal_model(model)
    if "save_original_format" not in save_kwargs and _saving_converts_area_weights(model):
        logger.info(
            "Saving %s with save_original_format=False: transformers' conversion mapping would "
            "reshape its area weights.",
            type(model).__name__,
        )
        save_kwargs["save_original_format"] = False
    model.save_pretrained(folder, **save_kwargs)
    write_model_card(model, folder, repo_id=repo_id)
    return Path(folder)
