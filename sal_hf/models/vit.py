"""SAL handler for the Vision Transformer: `ViTForImageClassification`.

Regions, in execution order:

- `vit.embeddings` (patch projection, [CLS] token, position embeddings, dropout);
- every layer `vit.layers.{i}`, whose `mlp.fc1` and `mlp.fc2` become area layers.

The head is the final `vit.layernorm` followed by the classifier (which reads the [CLS] token);
it learns from its true local gradient. The image-level error `[batch, labels]` reaches every
token (patch) of every layer through the layer's fixed feedback matrix.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import ViTForImageClassification

from ..config import SALConfig
from ..conversion import register_handler
from ..regions import SALLayout
from .transformer_blocks import block_regions, embedding_region

__all__ = ["ViTHandler"]

logger = logging.getLogger(__name__)

_MLP_LAYERS = ("mlp.fc1", "mlp.fc2")


class ViTHandler:
    """Each ViT layer is a region; its MLP becomes an area MLP."""

    name = "vit"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ViTForImageClassification)

    def build_layout(self, model: nn.Module, sal_config: SALConfig) -> SALLayout:
        if not isinstance(model.classifier, nn.Linear):
            raise ValueError(
                f"This ViTForImageClassification has num_labels={model.config.num_labels} and so "
                "no classifier to train; build it with num_labels >= 1."
            )
        vit = model.vit
        width = model.config.hidden_size
        regions = [embedding_region("vit.embeddings", vit.embeddings, width)]
        regions += block_regions(
            vit.layers, "vit.layers", width, _MLP_LAYERS, sal_config, mlp_name="mlp"
        )
        logger.debug("ViT layout: %d regions.", len(regions))
        return SALLayout(regions, vit.layernorm, model.classifier, model.classifier.out_features)


register_handler(ViTHandler())
