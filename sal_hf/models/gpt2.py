"""SAL handler for GPT-2: `GPT2LMHeadModel` and `GPT2ForSequenceClassification`.

Regions, in execution order:

- `transformer.drop`, the dropout applied to `wte(input_ids) + wpe(positions)`: the first
  module whose output is the summed embeddings, so `wte` and `wpe` learn from its feedback;
- every block `transformer.h.{i}`, whose `mlp.c_fc` and `mlp.c_proj` (`Conv1D`) become area
  layers.

- the final norm `transformer.ln_f`, a region of its own (no areas).

The head is `lm_head` (or `score`) alone, trained by its true local gradient. Its input is
detached, so its backward stops at its weight gradient: the vocabulary-sized product
`e @ W_lm` that backprop spends on the hidden states is never computed. `lm_head` stays tied to
`wte` when the model ties them; that shared matrix then receives both the head's local gradient
and the embedding region's feedback update.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from ..config import SALConfig
from ..conversion import register_handler
from ..regions import SALLayout
from .transformer_blocks import (
    block_regions,
    embedding_region,
    hand_padding_mask,
    loss_ignores_item_count,
    norm_region,
)

__all__ = ["GPT2Handler"]

logger = logging.getLogger(__name__)

_SUPPORTED = (GPT2LMHeadModel, GPT2ForSequenceClassification)


class GPT2Handler:
    """Each GPT-2 block is a region; its MLP becomes an area MLP."""

    name = "gpt2"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, _SUPPORTED)

    def build_layout(self, model: nn.Module, sal_config: SALConfig) -> SALLayout:
        transformer = model.transformer
        width = model.config.n_embd
        regions = [embedding_region("transformer.drop", transformer.drop, width)]
        regions += block_regions(
            transformer.h, "transformer.h", width, ("mlp.c_fc", "mlp.c_proj"), sal_config,
            mlp_name="mlp",
        )
        regions.append(norm_region("transformer.ln_f", transformer.ln_f, width))
        # GPT2ForSequenceClassification scores every position, `[batch, seq, labels]`, and picks
        # the last non-pad token inside its forward: the error, and so each block's feedback,
        # is non-zero at that token only.
        head_output = model.lm_head if isinstance(model, GPT2LMHeadModel) else model.score
        if not isinstance(model, GPT2LMHeadModel):
            loss_ignores_item_count(model)
        hand_padding_mask(model, transformer)  # sample routing averages real tokens only
        logger.debug("GPT-2 layout: %d regions.", len(regions))
        return SALLayout(regions, head_output, head_output, head_output.out_features)


register_handler(GPT2Handler())
