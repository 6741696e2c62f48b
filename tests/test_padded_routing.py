"""Per-sample routing of padded sequences: a sample's area must not depend on its batch's padding.

A per-sample router averages a sequence over its tokens. Padding tokens carry hidden states too,
so an average that includes them changes with the padding the rest of the batch needs (an
evaluation batch of snippets of mixed lengths is mostly padding), and the area with it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from sal_hf import AreaLinear, SALConfig, convert_to_sal, get_controller
from sal_hf.routing import Router

WIDTH, VOCAB, AREAS = 16, 97, 4
LENGTHS = (9, 2, 5, 12, 3, 1)  # real tokens of each sample, padded to the longest


def padded_inputs(lengths=LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `[batch, seq, WIDTH]` hidden states and the `[batch, seq]` mask of real tokens."""
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return torch.randn(len(lengths), max(lengths), WIDTH), mask


def test_sample_routing_averages_only_the_tokens_the_mask_keeps():
    router = Router(WIDTH, AREAS, routing_dim=8).eval()
    hidden, mask = padded_inputs()
    real_means = torch.stack([hidden[row, :n].mean(dim=0) for row, n in enumerate(LENGTHS)])

    router.sequence_mask = mask
    padded_areas = router(hidden)
    router.sequence_mask = None

    assert torch.equal(padded_areas, router(real_means))


def test_sample_routing_without_a_mask_averages_every_token():
    router = Router(WIDTH, AREAS, routing_dim=8).eval()
    hidden, _ = padded_inputs()

    assert torch.equal(router(hidden), router(hidden.mean(dim=1)))


def test_a_mask_of_another_shape_is_refused_with_both_shapes():
    router = Router(WIDTH, AREAS, routing_dim=8)
    hidden, mask = padded_inputs()
    router.sequence_mask = mask[:, :-1]

    with pytest.raises(ValueError, match=r"\(6, 11\).*\(6, 12, 16\)"):
        router(hidden)


def tiny_sal_bert() -> BertForSequenceClassification:
    """A converted, dropout-free BERT whose areas differ, so that the area changes the output."""
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )
    model = convert_to_sal(BertForSequenceClassification(config),
                           SALConfig(num_areas=AREAS, routing_dim=8))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AreaLinear):
                module.weight.add_(0.5 * torch.randn_like(module.weight))
    return model.eval()


def areas_and_logits(model, input_ids, attention_mask):
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    areas = [router.last_areas for router in get_controller(model).routers.values()]
    return torch.stack(areas, dim=1), logits


def test_bert_routes_and_classifies_a_padded_sample_as_it_does_alone():
    model = tiny_sal_bert()
    _, mask = padded_inputs()
    input_ids = torch.randint(1, VOCAB, mask.shape).masked_fill(mask == 0, 0)

    batch_areas, batch_logits = areas_and_logits(model, input_ids, mask)
    for row, length in enumerate(LENGTHS):
        alone = input_ids[row : row + 1, :length]
        areas, logits = areas_and_logits(model, alone, torch.ones_like(alone))
        assert torch.equal(batch_areas[row], areas[0]), f"sample {row} changed area"
        torch.testing.assert_close(batch_logits[row], logits[0], rtol=1e-4, atol=1e-5)


def test_bert_routers_forget_the_mask_after_the_forward_pass():
    model = tiny_sal_bert()
    _, mask = padded_inputs()
    input_ids = torch.randint(1, VOCAB, mask.shape)

    areas_and_logits(model, input_ids, mask)

    assert all(router.sequence_mask is None for router in get_controller(model).routers.values())
