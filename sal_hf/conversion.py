"""`convert_to_sal`: turn a `transformers` model into its SAL variant.

Conversion is done by architecture handlers, tried in registration order. A handler replaces the
dense layers that become area layers (each area a copy of the original layer, so the converted
model computes what the original did) and returns a `SALLayout` naming the model's regions and
head. Adding an architecture is writing one handler and registering it with `register_handler`.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from .areas import AreaLinear
from .config import SALConfig
from .regions import SALController, SALLayout, get_controller

__all__ = [
    "ArchitectureHandler",
    "convert_to_sal",
    "register_handler",
    "supported_architectures",
    "upcycle_linear",
    "AUTO_FEEDBACK_RANK",
    "AUTO_FEEDBACK_RANK_ABOVE",
    "AUTO_FEEDBACK_BLOCKS",
]

logger = logging.getLogger(__name__)

# Outputs wider than this (vocabularies) get compressed feedback of this rank unless set.
AUTO_FEEDBACK_RANK_ABOVE = 1024
AUTO_FEEDBACK_RANK = 256
AUTO_FEEDBACK_BLOCKS = 8


class ArchitectureHandler(Protocol):
    """What a handler provides. `name` is what error messages list."""

    name: str

    def matches(self, model: nn.Module) -> bool:
        """True when this handler converts `model`."""

    def build_layout(self, model: nn.Module, sal_config: SALConfig) -> SALLayout:
        """Replace the model's area layers in place and describe its regions and head."""


_HANDLERS: list[ArchitectureHandler] = []


def register_handler(handler: ArchitectureHandler) -> ArchitectureHandler:
    """Add `handler` to the ones `convert_to_sal` tries (after those already registered)."""
    _HANDLERS.append(handler)
    return handler


def supported_architectures() -> list[str]:
    """Names of the architectures the registered handlers convert."""
    _load_builtin_handlers()
    return [handler.name for handler in _HANDLERS]


def _load_builtin_handlers() -> None:
    # Imported lazily: each model family module registers its handler on import.
    from . import models  # noqa: F401


def upcycle_linear(linear: nn.Linear, sal_config: SALConfig) -> AreaLinear:
    """An `AreaLinear` whose every area is a copy of `linear`; frozen if `linear` was."""
    return AreaLinear.from_dense(
        linear.weight, linear.bias, sal_config.num_areas, sal_config.shared_path
    )


def _child_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every submodule: what a handler may replace."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children()]


def _restore_child_modules(children: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, child in children:
        if getattr(parent, name, None) is not child:
            setattr(parent, name, child)


def _resolve_feedback_rank(sal_config: SALConfig, num_outputs: int) -> SALConfig:
    if sal_config.feedback_rank is not None or num_outputs <= AUTO_FEEDBACK_RANK_ABOVE:
        return sal_config
    blocks = sal_config.feedback_blocks or AUTO_FEEDBACK_BLOCKS
    if AUTO_FEEDBACK_RANK % blocks:
        raise ValueError(
            f"feedback_blocks={blocks} must divide the feedback rank, which convert_to_sal chose "
            f"as {AUTO_FEEDBACK_RANK} for {num_outputs} outputs (feedback_rank is unset): set "
            f"feedback_rank yourself, or pick feedback_blocks dividing {AUTO_FEEDBACK_RANK}."
        )
    values = sal_config.to_dict()
    values["feedback_rank"] = AUTO_FEEDBACK_RANK
    values["feedback_blocks"] = blocks
    logger.info(
        "Output width %d > %d: using compressed feedback of rank %d in %d blocks (set "
        "feedback_rank and feedback_blocks to choose).", num_outputs, AUTO_FEEDBACK_RANK_ABOVE,
        AUTO_FEEDBACK_RANK, values["feedback_blocks"],
    )
    return SALConfig.from_dict(values)


def convert_to_sal(model: nn.Module, sal_config: SALConfig | None = None) -> nn.Module:
    """Convert `model` in place into its SAL variant and return it.

    Args:
        model: a supported `transformers` model (see `supported_architectures()`), pretrained or
            freshly initialised. Its dense MLP layers become area layers whose areas all start as
            copies of the originals, so outputs are unchanged until training begins.
        sal_config: the SAL settings; defaults to `SALConfig()` (method `sal`, 16 areas).

    Returns:
        The same model object, with `model.sal_controller` attached and the resolved settings in
        `model.config.sal_config`.

    Raises:
        ValueError: if the model is already converted or no handler supports it.
    """
    sal_config = sal_config if sal_config is not None else SALConfig()
    if get_controller(model) is not None:
        raise ValueError("This model is already a SAL model; convert the original model instead.")
    _load_builtin_handlers()
    handler = next((h for h in _HANDLERS if h.matches(model)), None)
    if handler is None:
        raise ValueError(
            f"convert_to_sal does not support {type(model).__name__}. Supported architectures: "
            f"{', '.join(supported_architectures())}. To add one, write an ArchitectureHandler "
            "and pass it to sal_hf.register_handler (see docs/transformers.md)."
        )
    children = _child_modules(model)
    try:
        with torch.no_grad():
            layout = handler.build_layout(model, sal_config)
        sal_config = _resolve_feedback_rank(sal_config, layout.num_outputs)
        controller = SALController(sal_config, layout)
    except Exception:
        _restore_child_modules(children)  # the model stays as it was, ready for another try
        raise
    controller.train(model.training)  # follow the model's mode, as any new submodule should
    model.add_module("sal_controller", controller)
    if hasattr(model, "config"):
        model.config.sal_config = sal_config.to_dict()
        model.config.sal_architecture = handler.name
    logger.info(
        "Converted %s to SAL: %d regions, method=%s, num_areas=%d.",
        type(model).__name__, len(layout.regions), sal_config.method, sal_config.num_areas,
    )
    return model
