"""What the transformer handlers (GPT-2, Llama, BERT, ViT) share: upcycling a block's MLP into
area layers and describing blocks and embeddings as regions.

Every transformer family is converted the same way:

- the embedding output is a region with no area layers and `detach_input=False` (its input is
  token ids or pixels), so the embedding tables learn from their own feedback;
- every block is a region of width `hidden_size`: its input is detached, its router reads that
  input, and its MLP's dense layers become `AreaLinear`s whose areas are copies of the originals;
- the head learns from its true local gradient (the handler names where it starts and ends);
  a decoder's final norm is a region of its own, so that the head is the output layer alone.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..areas import AreaLinear
from ..config import SALConfig
from ..conversion import upcycle_linear
from ..regions import RegionSpec

__all__ = [
    "block_regions",
    "embedding_region",
    "hand_padding_mask",
    "loss_ignores_item_count",
    "norm_region",
    "replace_with_areas",
    "upcycle_conv1d",
    "upcycle_dense",
]

logger = logging.getLogger(__name__)


def upcycle_conv1d(conv: Conv1D, sal_config: SALConfig) -> AreaLinear:
    """An `AreaLinear` whose every area is a copy of GPT-2's `Conv1D`.

    `Conv1D` computes `x @ weight + bias` with `weight` `[in, out]`; an area stores `[out, in]`,
    so the weight is transposed. A frozen `Conv1D` gives a frozen area layer.
    """
    # The transposed weight as a parameter, whose flag `from_dense` keeps (a plain view has none).
    weight = nn.Parameter(conv.weight.detach().T, requires_grad=conv.weight.requires_grad)
    return AreaLinear.from_dense(weight, conv.bias, sal_config.num_areas, sal_config.shared_path)


def upcycle_dense(layer: nn.Module, sal_config: SALConfig) -> AreaLinear:
    """Upcycle an `nn.Linear` or a `Conv1D` into an `AreaLinear` computing the same function.

    The area layer keeps the dense layer's `requires_grad`: what was frozen stays frozen.
    """
    if isinstance(layer, nn.Linear):
        return upcycle_linear(layer, sal_config)
    if isinstance(layer, Conv1D):
        return upcycle_conv1d(layer, sal_config)
    raise ValueError(
        f"Cannot turn a {type(layer).__name__} into an area layer: only nn.Linear and "
        "transformers' Conv1D are supported. Check the layer names the handler upcycles."
    )


def _resolve_parent(root: nn.Module, dotted_name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = dotted_name.rpartition(".")
    try:
        root.get_submodule(dotted_name)
    except AttributeError as error:
        raise ValueError(
            f"{type(root).__name__} has no submodule {dotted_name!r}; the handler expects the "
            "layout of this architecture in the installed transformers version."
        ) from error
    return root.get_submodule(parent_name), leaf


def replace_with_areas(
    block: nn.Module, dense_names: Sequence[str], sal_config: SALConfig
) -> list[AreaLinear]:
    """Replace the dense layers `dense_names` (dotted, relative to `block`) by area layers.

    Returns the new area layers in the order given.
    """
    area_layers = []
    for dotted_name in dense_names:
        parent, leaf = _resolve_parent(block, dotted_name)
        area_layer = upcycle_dense(getattr(parent, leaf), sal_config)
        setattr(parent, leaf, area_layer)
        area_layers.append(area_layer)
    return area_layers


def block_regions(
    blocks: Sequence[nn.Module],
    prefix: str,
    width: int,
    dense_names: Sequence[str],
    sal_config: SALConfig,
    mlp_name: str | None = None,
) -> list[RegionSpec]:
    """One region per block, named `f"{prefix}.{index}"`, with its MLP upcycled into areas.

    Each block must be called with its hidden states as first positional argument or as
    `hidden_states=`, and return them (alone, or first in a tuple): the region hooks detach that
    input and record that output. `mlp_name` names the block's MLP when it is one module that
    holds every dense layer of `dense_names` and maps each token on its own (no residual
    inside): its tokens are then grouped by area once for all its area layers.
    """
    # Limitation: a block routes whatever tokens it is called with. During cached generation
    # that is only the new tokens, so per-sample routing there can differ from routing the
    # full sequence once the areas have been trained apart.
    regions = []
    for index, block in enumerate(blocks):
        area_layers = replace_with_areas(block, dense_names, sal_config)
        area_block = None if mlp_name is None else block.get_submodule(mlp_name)
        regions.append(
            RegionSpec(f"{prefix}.{index}", block, width, area_layers, area_block=area_block)
        )
    logger.debug("Upcycled %s of %d blocks under %s.", list(dense_names), len(regions), prefix)
    return regions


def embedding_region(name: str, module: nn.Module, width: int) -> RegionSpec:
    """The region whose output is the embeddings fed to the first block (no area layers)."""
    return RegionSpec(name, module, width, detach_input=False)



def norm_region(name: str, module: nn.Module, width: int) -> RegionSpec:
    """The final norm of a decoder, as a region of its own between the last block and the head.

    Learning its gain from feedback, rather than from the head's backward, is what lets the
    head's input be detached: for a vocabulary-sized head that skips backprop's costliest
    product, `e @ W_head` (`[tokens, vocab] x [vocab, width]`).
    """
    return RegionSpec(name, module, width)


def loss_ignores_item_count(model: nn.Module) -> None:
    """Tell the Trainer that `model`'s loss is a plain mean over its own micro-batch.

    BERT's and GPT-2's classification heads compute `CrossEntropyLoss()` (or MSE, BCE) and
    ignore `num_items_in_batch`, but their `forward` takes `**kwargs`, from which the Trainer
    (transformers 5.25) concludes that the loss is already normalised over the accumulated batch
    and does not divide it by the accumulation steps: with gradient accumulation, the loss,
    its gradients and the logged loss would grow with the number of micro-batches, for backprop
    too. `accepts_loss_kwargs = False` makes the Trainer divide.
    """
    model.accepts_loss_kwargs = False


def hand_padding_mask(model: nn.Module, encoder: nn.Module) -> None:
    """Hooks on `encoder` (the module called with `attention_mask`) that hand its 2-d padding
    mask to the model's SAL controller for one forward pass (`SALController.set_sequence_mask`).

    The controller exists only once `convert_to_sal` has built it, so it is looked up at call
    time. A mask that is not `[batch, seq]` (a custom 4-d mask) is not used. During cached
    generation the mask also covers the cached tokens; its last columns, those of the tokens
    the blocks see, are handed on.
    """
    # Limitation: a 4-d mask is not read. `generate` with a static cache builds one before the
    # decoder runs, so per-sample routing of a left-padded prompt then averages its padding.
    signature = inspect.signature(encoder.forward)

    def set_mask(mask: torch.Tensor | None) -> None:
        controller = getattr(model, "sal_controller", None)
        if controller is not None:
            controller.set_sequence_mask(mask)

    def give(module, args, kwargs):
        arguments = signature.bind_partial(*args, **kwargs).arguments
        mask = arguments.get("attention_mask")
        tokens = arguments.get("input_ids")
        if tokens is None:
            tokens = arguments.get("inputs_embeds")
        usable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None
        if usable and mask.shape[1] >= tokens.shape[1]:
            set_mask(mask[:, mask.shape[1] - tokens.shape[1]:])
        else:
            set_mask(None)

    def take_back(module, args, output):
        set_mask(None)  # a later call without the encoder (a region alone) uses every token

    encoder.register_forward_pre_hook(give, with_kwargs=True)
    encoder.register_forward_hook(take_back)
