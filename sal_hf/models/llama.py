"""SAL handler for Llama: `LlamaForCausalLM` and `LlamaForSequenceClassification`.

Regions, in execution order:

- `model.embed_tokens`, the token embedding (Llama adds no position embedding; rotary positions
  act inside attention);
- every decoder layer `model.layers.{i}`, whose `mlp.gate_proj`, `mlp.up_proj` and
  `mlp.down_proj` become area layers sharing the layer's routing.

- the final RMS norm `model.norm`, a region of its own (no areas).

The head is `lm_head` (or `score`) alone, trained by its true local gradient; its detached input
spares the vocabulary-sized product `e @ W_lm` of backprop (see the GPT-2 handler). Tied
embeddings (`tie_word_embeddings=True`) stay tied.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from ..config import SALConfig
from ..conversion import register_handler
from ..regions import SALLayout
from .transformer_blocks import block_regions, embedding_region, hand_padding_mask, norm_region

__all__ = ["LlamaHandler"]

logger = logging.getLogger(__name__)

_SUPPORTED = (LlamaForCausalLM, LlamaForSequenceClassification)
_MLP_LAYERS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LlamaHandler:
    """Each Llama decoder layer is a region; its gated MLP becomes an area MLP."""

    name = "llama"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, _SUPPORTED)

    def build_layout(self, model: nn.Module, sal_config: SALConfig) -> SALLayout:
        decoder = model.model
        width = model.config.hidden_size
        # Limitation: the embedding region is `embed_tokens`, which the forward skips when it is
        # given `inputs_embeds`; a SAL training step then stops with "regions did not run".
        regions = [embedding_region("model.embed_tokens", decoder.embed_tokens, width)]
        regions += block_regions(
            decoder.layers, "model.layers", width, _MLP_LAYERS, sal_config, mlp_name="mlp"
        )
        regions.append(norm_region("model.norm", decoder.norm, width))
        # LlamaForSequenceClassification scores every position and picks the last non-pad token
        # inside its forward: each block's feedback is non-zero at that token only.
        head_output = model.lm_head if isinstance(model, LlamaForCausalLM) else model.score
        hand_padding_mask(model, decoder)  # sample routing averages real tokens only
        logger.debug("Llama layout: %d regions.", len(regions))
        return SALLayout(regions, head_output, head_output, head_output.out_features)


register_handler(LlamaHandler())
