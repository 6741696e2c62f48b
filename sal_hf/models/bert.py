"""SAL handler for BERT encoders (MiniLM included) with a classifier on top.

Converts any model with a `bert` attribute that is a `BertModel` and a `classifier` that is an
`nn.Linear`: `BertForSequenceClassification`, `BertForMultipleChoice`,
`BertForTokenClassification`, and your own classifiers built the same way.

Regions, in execution order:

- `bert.embeddings` (word + position + token-type embeddings, LayerNorm, dropout);
- every layer `bert.encoder.layer.{i}`, whose `intermediate.dense` and `output.dense` become
  area layers.

The head is the pooler (when the encoder has one) followed by the classifier, and learns from its
true local gradient. A sentence-level error `[batch, labels]` reaches every token of every layer
through the same fixed matrix; a token classifier's error reaches each token on its own.

The encoder's 2-d `attention_mask` is handed to the controller for each forward pass
(`SALController.set_sequence_mask`): per-sample routers average a sequence over its real tokens
only, and a sentence-level error reaches the real tokens only, as backprop's gradient does. So a
snippet's area and its update are the same whatever padding its batch needs (an evaluation batch
of mixed lengths is mostly padding).
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import BertModel

from ..config import SALConfig
from ..conversion import register_handler
from ..regions import SALLayout
from .transformer_blocks import (
    block_regions,
    embedding_region,
    hand_padding_mask,
    loss_ignores_item_count,
)

__all__ = ["BertHandler"]

logger = logging.getLogger(__name__)

_MLP_LAYERS = ("intermediate.dense", "output.dense")


class BertHandler:
    """Each BERT layer is a region; its feed-forward layers become an area MLP."""

    name = "bert"

    def matches(self, model: nn.Module) -> bool:
        encoder = getattr(model, "bert", None)
        classifier = getattr(model, "classifier", None)
        return isinstance(encoder, BertModel) and isinstance(classifier, nn.Linear)

    def build_layout(self, model: nn.Module, sal_config: SALConfig) -> SALLayout:
        bert = model.bert
        _check_token_routing(bert, sal_config)
        width = bert.config.hidden_size
        regions = [embedding_region("bert.embeddings", bert.embeddings, width)]
        regions += block_regions(
            bert.encoder.layer, "bert.encoder.layer", width, _MLP_LAYERS, sal_config
        )
        # Limitation: the pooler is taken to feed the classifier whenever the encoder has one;
        # a model that classifies the sequence output despite a pooler is not supported.
        head_input = bert.pooler if bert.pooler is not None else model.classifier
        hand_padding_mask(model, bert)
        loss_ignores_item_count(model)  # every supported BERT head has a plain mean loss
        logger.debug("BERT layout: %d regions.", len(regions))
        return SALLayout(regions, head_input, model.classifier, model.classifier.out_features)


def _check_token_routing(bert: BertModel, sal_config: SALConfig) -> None:
    # Feed-forward chunking splits the sequence, so per-token areas `[batch, seq]` would not
    # match the chunk `[batch, chunk]`; per-sample areas `[batch]` do.
    chunk_size = bert.config.chunk_size_feed_forward
    if sal_config.routing == "token" and sal_config.uses_routing and chunk_size > 0:
        raise ValueError(
            f"routing='token' does not work with chunk_size_feed_forward={chunk_size}: set "
            "config.chunk_size_feed_forward = 0 before converting, or use routing='sample'."
        )


register_handler(BertHandler())
