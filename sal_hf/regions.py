"""Regions: the units that receive their own learning signal, and the hooks that make them so.

A region is any module (an MLP layer, a transformer block, an embedding) whose output receives
`delta_l` from direct feedback. `SALController` is attached to a converted model as
`model.sal_controller`. Through forward hooks on the model's own modules it

- detaches the input of every region and of the head (stop-gradient: no gradient ever crosses a
  region boundary), unless the method is `bp`;
- runs each routed region's router on that input and hands the chosen areas to its area layers;
- passes each region's output through `FeedbackInjector` and, at the head's output, inserts
  `FeedbackTap`, so that the one `backward()` of the step gives the head its true local
  gradient and every region its feedback update.

The model's own forward code is left untouched, which is why any architecture can be converted by
naming its regions and head.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .areas import AreaLinear, AreaSort
from .config import SALConfig
from .feedback import DirectFeedback, ErrorSignal, FeedbackInjector, FeedbackTap
from .routing import Router, check_sequence_mask

__all__ = ["RegionSpec", "SALLayout", "SALController", "get_controller"]


@dataclass
class RegionSpec:
    """One region of a model, as an architecture handler describes it.

    Args:
        name: a readable name used in logs (`"layers.0"`, `"embeddings"`).
        module: the module whose output is the region's output. Unless `detach_input` is False,
            its first positional argument (or `hidden_states=`) is the region input.
        width: width of the region output (its last dim).
        area_layers: the area layers inside the region; they share the region's router.
        detach_input: False for a region whose input is not a hidden state (token ids).
        area_block: a submodule holding all of `area_layers` that maps every token on its own
            (a transformer MLP, without the residual): its rows are then sorted by area once, on
            entry, rather than by each area layer (`sal_hf.areas.AreaSort`).
    """

    name: str
    module: nn.Module
    width: int
    area_layers: list[AreaLinear] = field(default_factory=list)
    detach_input: bool = True
    area_block: nn.Module | None = None

    @property
    def input_width(self) -> int:
        return self.area_layers[0].in_features if self.area_layers else self.width


@dataclass
class SALLayout:
    """Where SAL acts in a model: its regions in execution order, and its head.

    `head_input` is the module whose input is detached (the head's entry); `head_output` the
    module whose output is the logits `[..., num_outputs]`. They may be the same module.
    """

    regions: list[RegionSpec]
    head_input: nn.Module
    head_output: nn.Module
    num_outputs: int


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return next(iter(value.values()))
    return value[0]


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, dict):
        key = next(iter(value))
        value[key] = tensor
        return value
    return type(value)([tensor, *value[1:]])


class SALController(nn.Module):
    """Routers, feedback matrices and region hooks of one converted model."""

    def __init__(self, sal_config: SALConfig, layout: SALLayout) -> None:
        super().__init__()
        self.sal_config = sal_config
        # Plain lists: these modules belong to the model, not to the controller.
        self._regions: list[RegionSpec] = list(layout.regions)
        # A tuple, so that nn.Module does not register the head under the controller too.
        self._head: tuple[nn.Module, nn.Module] = (layout.head_input, layout.head_output)
        self.routers = nn.ModuleDict(self._build_routers(sal_config))
        self.feedback = self._build_feedback(sal_config, layout.num_outputs)
        self._hidden: dict[int, torch.Tensor] = {}
        self._areas: dict[int, torch.Tensor] = {}
        self._signal = ErrorSignal()
        self._warned_eval_mode = False
        # `[batch, seq]`, nonzero for real tokens, while a handler knows it (BERT, GPT-2, Llama):
        # routers leave padding out and a sample-level error reaches only real tokens.
        self.sequence_mask: torch.Tensor | None = None
        self._install_hooks()

    @property
    def regions(self) -> Sequence[RegionSpec]:
        return tuple(self._regions)

    def set_sequence_mask(self, mask: torch.Tensor | None) -> None:
        """Hand the padding mask of the coming forward pass (`[batch, seq]`, nonzero for real
        tokens) to the routers and the feedback, or take it back with None.

        A padding token never reaches the loss, so backprop gives it no gradient; broadcast
        feedback would give it the sample's `delta` and train the blocks on what they compute
        for padding. With the mask, a sample's update is the same whatever padding its batch
        needs, as its area is.
        """
        self.sequence_mask = mask
        for router in self.routers.values():
            router.sequence_mask = mask

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's parameters (its input and output modules, each parameter once). A weight
        the head shares with another module (GPT-2's tied `lm_head`) is among them."""
        seen: dict[int, nn.Parameter] = {}
        for module in self._head:
            for parameter in module.parameters():
                seen.setdefault(id(parameter), parameter)
        return list(seen.values())

    def _build_routers(self, cfg: SALConfig) -> dict[str, Router]:
        routers = {}
        for index, region in enumerate(self._regions):
            if not region.area_layers or cfg.num_areas < 2:
                continue
            routers[str(index)] = Router(
                region.input_width,
                cfg.num_areas,
                cfg.routing_dim,
                seed=cfg.seed + 104729 * (index + 1),
                per_token=cfg.routing == "token",
                temperature=cfg.router_temperature,
                balance_loss_weight=cfg.balance_loss_weight,
                prototype_loss_weight=cfg.prototype_loss_weight,
                momentum=cfg.router_momentum,
            )
        for router in routers.values():
            router.to(device=self._device())
        return routers

    def _device(self) -> torch.device:
        """Where the model's parameters are (a region may have none, e.g. a dropout)."""
        modules = [region.module for region in self._regions] + list(self._head)
        for module in modules:
            parameter = next(module.parameters(), None)
            if parameter is not None:
                return parameter.device
        return torch.device("cpu")

    def _build_feedback(self, cfg: SALConfig, num_outputs: int) -> DirectFeedback | None:
        if not cfg.uses_feedback:
            return None
        areas_per_region = [
            cfg.num_areas if cfg.feedback == "area" and str(i) in self.routers else 1
            for i in range(len(self._regions))
        ]
        feedback = DirectFeedback(
            num_outputs,
            [region.width for region in self._regions],
            areas_per_region,
            rank=cfg.feedback_rank,
            blocks=cfg.feedback_blocks or 1,
            scale=cfg.feedback_scale,
            seed=cfg.seed,
        )
        return feedback.to(self._device())

    def reset_frozen_buffers(self) -> None:
        """Regenerate prototypes and feedback matrices from the seed on the current device."""
        for router in self.routers.values():
            router.reset_frozen_buffers()
        if self.feedback is not None:
            self.feedback.reset_frozen_buffers(self._device())

    def __deepcopy__(self, memo):
        # Limitation: the hooks are closures over this controller, so a deep copy of a converted
        # model would get hooks that still drive the original: refused rather than silently wrong.
        raise TypeError(
            "A model converted with sal_hf.convert_to_sal cannot be deep-copied: its hooks belong "
            "to the original. Copy the model before converting and convert the copy, or save it "
            "with save_pretrained and load it with an AutoSALModelFor* class."
        )

    def _install_hooks(self) -> None:
        self._handles = []
        # (module, hook, handle) of the hooks that record outputs and put feedback on them.
        self._output_hooks: list[tuple[nn.Module, Any, Any]] = []
        for index, region in enumerate(self._regions):
            pre = self._make_region_pre_hook(index, region)
            self._handles.append(region.module.register_forward_pre_hook(pre, with_kwargs=True))
            self._add_output_hook(region.module, self._make_region_post_hook(index))
        for index, region in enumerate(self._regions):
            if region.area_block is not None and str(index) in self.routers:
                self._handles += AreaSort(region.area_layers).install(region.area_block)
        head_input, head_output = self._head
        self._handles.append(
            head_input.register_forward_pre_hook(self._head_pre_hook, with_kwargs=True)
        )
        self._add_output_hook(head_output, self._head_post_hook)

    def _add_output_hook(self, module: nn.Module, hook) -> None:
        handle = module.register_forward_hook(hook)
        self._handles.append(handle)
        self._output_hooks.append((module, hook, handle))

    def put_output_hooks_last(self) -> None:
        """Run SAL's output hooks after every forward hook added since conversion.

        A wrapper installed later (DeepSpeed ZeRO-3 wraps every module's output in hooks of its
        own, whose backward gathers the module's parameters) must see the output before SAL puts
        feedback on it; otherwise the feedback bypasses the wrapper's backward, and a region whose
        parameters are its own (an `nn.Embedding`) fails in backward under ZeRO-3 with a size
        mismatch against its empty partitioned weight. `SALTrainer` calls this when training
        begins, after the model is wrapped.
        """
        hooks, self._output_hooks = self._output_hooks, []
        for module, hook, handle in hooks:
            handle.remove()
            self._handles.remove(handle)
            self._add_output_hook(module, hook)

    def _learning(self) -> bool:
        return self.sal_config.uses_feedback and self.training and torch.is_grad_enabled()

    def _make_region_pre_hook(self, index: int, region: RegionSpec):
        router = self.routers[str(index)] if str(index) in self.routers else None

        def hook(module, args, kwargs):
            if index == 0:  # a new forward pass: forget what an interrupted one left behind
                self._hidden.clear()
                self._areas.clear()
                self._signal = ErrorSignal()
            if not region.detach_input:
                return None
            in_args = bool(args)
            inputs = args[0] if in_args else kwargs["hidden_states"]
            if self.sal_config.uses_feedback:
                inputs = inputs.detach()
            if router is not None:
                areas = router(inputs)
                self._areas[index] = areas
                for layer in region.area_layers:
                    layer.pending_areas = areas
            if in_args:
                return (inputs, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs}

        return hook

    def _make_region_post_hook(self, index: int):
        area_layers = self._regions[index].area_layers

        def hook(module, args, output):
            hidden = _first_tensor(output)
            areas = self._areas.get(index)
            if areas is not None and self.training and hidden.requires_grad:
                hidden = _RestoreAreas.apply(area_layers, areas, hidden)
            if self._learning():
                if index in self._hidden:
                    raise RuntimeError(
                        f"region {self._regions[index].name} ran twice in one forward pass; "
                        "SAL regions must be distinct modules, each called once."
                    )
                mask = self._mask_for(hidden)
                hidden = FeedbackInjector.apply(
                    self.feedback, self._signal, index, areas, hidden, mask
                )
                self._hidden[index] = hidden
            if hidden is _first_tensor(output):
                return None
            return _replace_first(output, hidden)

        return hook

    def _mask_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = self.sequence_mask
        if mask is None or hidden.dim() < 3:
            return None
        check_sequence_mask(mask, hidden, "a region output")
        return mask

    def _head_pre_hook(self, module, args, kwargs):
        if not self.sal_config.uses_feedback:
            return None
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: kwargs[key].detach()}

    def _head_post_hook(self, module, args, output):
        if not self._learning():
            self._hidden.clear()
            self._warn_if_only_the_head_would_learn(_first_tensor(output))
            return None
        missing = [r.name for i, r in enumerate(self._regions) if i not in self._hidden]
        if missing:
            raise RuntimeError(f"regions {missing} did not run before the head in this forward.")
        hidden = [self._hidden[i] for i in range(len(self._regions))]
        self._hidden.clear()
        logits = FeedbackTap.apply(self.feedback, self._signal, _first_tensor(output), *hidden)
        return _replace_first(output, logits)

    def _warn_if_only_the_head_would_learn(self, logits: torch.Tensor) -> None:
        # Regions get their feedback only in training mode; a backward pass from a forward in
        # eval mode (a fine-tuning loop that never calls .train(), e.g. after from_pretrained,
        # which returns the model in eval mode) would silently train the head alone. The hook
        # fires only if a backward reaches the logits: inference without `no_grad` stays quiet.
        if self.training or not self.sal_config.uses_feedback or self._warned_eval_mode:
            return
        if torch.is_grad_enabled() and logits.requires_grad:
            logits.register_hook(self._warn_eval_mode_backward)

    def _warn_eval_mode_backward(self, gradient: torch.Tensor) -> None:
        if not self._warned_eval_mode:
            self._warned_eval_mode = True
            warnings.warn(
                "A backward pass ran through this SAL model in eval mode: it trains the head "
                "alone, since regions receive their feedback only in training mode. Call "
                "model.train() before training steps.", UserWarning, stacklevel=2,
            )

    def router_loss(self) -> torch.Tensor | None:
        """Sum of the routers' local losses from the last training forward pass, then cleared.

        Add it to the task loss before the step's single `backward()` (`SALTrainer` does).
        """
        losses = []
        for router in self.routers.values():
            if router.last_loss is not None:
                losses.append(router.last_loss)
                router.last_loss = None
        return torch.stack(losses).sum() if losses else None

    def take_usage(self, split: str = "train") -> dict[str, torch.Tensor]:
        """Per routed region, the area counts since the last call for `split` (then reset)."""
        return {
            self._regions[int(index)].name: router.take_usage(split)
            for index, router in self.routers.items()
        }


class _RestoreAreas(torch.autograd.Function):
    """Identity on a region's output; its backward hands the region's area layers the areas of
    the forward pass being differentiated.

    A streamed (recomputed) region runs its forward again during backward, and its area layers
    read the areas they were last given. Another forward between this one and its backward (an
    evaluation, a second batch) would have replaced them; this puts them back just before the
    recomputation, which autograd starts only once the region's output gradient has arrived.
    """

    @staticmethod
    def forward(ctx, area_layers, areas, hidden):  # noqa: D102
        ctx.area_layers = area_layers
        ctx.areas = areas
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        for layer in ctx.area_layers:
            layer.pending_areas = ctx.areas
        return None, None, grad


def get_controller(model: nn.Module) -> SALController | None:
    """The `SALController` of a converted model (through DDP/DeepSpeed wrappers), or None."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "sal_controller"):
        inner = inner.module
    return getattr(inner, "sal_controller", None)
