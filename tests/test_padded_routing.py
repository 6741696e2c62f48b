"""Padded sequences: a sample's area and its update must not depend on its batch's padding.

A per-sample router averages a sequence over its tokens. Padding tokens carry hidden states too,
so an average that includes them changes with the padding the rest of the batch needs (an
evaluation batch of snippets of mixed lengths is mostly padding), and the area with it. In the
same way, a sentence-level error broadcast to every token would train the blocks on what they
compute for padding, which backprop never does.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

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


@pytest.mark.parametrize("per_token", [False, True])
def test_a_mask_of_another_shape_is_refused_with_both_shapes(per_token):
    router = Router(WIDTH, AREAS, routing_dim=8, per_token=per_token)
    hidden, mask = padded_inputs()
    router.sequence_mask = mask[:, :-1]

    with pytest.raises(ValueError, match=r"\(6, 11\).*\(6, 12, 16\)"):
        router(hidden)


CLASSIFIERS = ["bert", "gpt2_classifier", "llama_classifier"]


def tiny_classifier(arch: str) -> nn.Module:
    """A dropout-free two-way classifier of `arch`, token 0 its padding."""
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=2,
        ))
    if arch == "gpt2_classifier":
        return GPT2ForSequenceClassification(GPT2Config(
            vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=32, num_labels=2,
            pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ))
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, num_labels=2,
        pad_token_id=0,
    ))


def tiny_sal_classifier(arch: str = "bert", method: str = "sal", routing: str = "sample"
                        ) -> nn.Module:
    """A converted classifier whose areas differ, so that the area changes the output."""
    options = {"num_areas": AREAS, "routing_dim": 8, "routing": routing} if method == "sal" else {}
    model = convert_to_sal(tiny_classifier(arch), SALConfig(method=method, **options))
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


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_a_padded_sample_is_routed_and_classified_as_it_is_alone(arch):
    torch.manual_seed(0)
    model = tiny_sal_classifier(arch)
    _, mask = padded_inputs()
    input_ids = torch.randint(1, VOCAB, mask.shape).masked_fill(mask == 0, 0)

    batch_areas, batch_logits = areas_and_logits(model, input_ids, mask)
    for row, length in enumerate(LENGTHS):
        alone = input_ids[row : row + 1, :length]
        areas, logits = areas_and_logits(model, alone, torch.ones_like(alone))
        assert torch.equal(batch_areas[row], areas[0]), f"sample {row} changed area"
        torch.testing.assert_close(batch_logits[row], logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_routers_and_feedback_forget_the_mask_after_the_forward_pass(arch):
    model = tiny_sal_classifier(arch)
    _, mask = padded_inputs()
    input_ids = torch.randint(1, VOCAB, mask.shape)

    areas_and_logits(model, input_ids, mask)

    controller = get_controller(model)
    assert controller.sequence_mask is None
    assert all(router.sequence_mask is None for router in controller.routers.values())


def sal_gradients(arch, method, input_ids, attention_mask, routing="sample"
                  ) -> dict[str, torch.Tensor]:
    """Every parameter gradient of one training step of a freshly built (same seed) model."""
    torch.manual_seed(0)
    model = tiny_sal_classifier(arch, method, routing).train()
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([1]))
    router_loss = get_controller(model).router_loss()
    (output.loss if router_loss is None else output.loss + router_loss).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "arch, method, routing",
    [("bert", "sal", "sample"), ("bert", "dfa", "sample"), ("gpt2_classifier", "sal", "sample"),
     ("llama_classifier", "sal", "sample"),
     # Per token, padding tokens get areas but no say in the centring, loss or counts.
     ("bert", "sal", "token"), ("gpt2_classifier", "sal", "token")],
)
def test_a_padded_sample_gets_the_update_it_gets_alone(arch, method, routing):
    torch.manual_seed(1)
    alone = torch.randint(1, VOCAB, (1, 5))
    padded = torch.cat([alone, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = (torch.arange(12) < 5).long().unsqueeze(0)

    expected = sal_gradients(arch, method, alone, torch.ones_like(alone), routing)
    got = sal_gradients(arch, method, padded, mask, routing)

    assert set(got) == set(expected)
    assert any(re.search(r"\.0\.mlp|layer\.0\.output", name) for name in got)  # blocks learn
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_any_nonzero_mask_value_marks_a_real_token_and_weighs_nothing():
    # Attention treats every nonzero entry alike; so must the routers' mean and the feedback.
    torch.manual_seed(1)
    tokens = torch.randint(1, VOCAB, (1, 12))
    mask = (torch.arange(12) < 5).long().unsqueeze(0)

    expected = sal_gradients("bert", "sal", tokens, mask)
    for other in (2 * mask, 0.5 * mask.float(), mask.bool()):
        got = sal_gradients("bert", "sal", tokens, other)
        for name, gradient in expected.items():
            torch.testing.assert_close(got[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_token_routing_counts_only_real_tokens():
    router = Router(WIDTH, AREAS, routing_dim=8, per_token=True).train()
    hidden, mask = padded_inputs()
    router.sequence_mask = mask
    areas = router(hidden)

    assert areas.shape == mask.shape  # padding tokens are routed too
    assert router.take_usage("train").sum().item() == sum(LENGTHS)
    real_rows = router.projection(hidden[mask.bool()]).float()
    torch.testing.assert_close(router.running_mean, real_rows.mean(dim=0).detach())


def test_a_mask_that_does_not_fit_the_region_outputs_is_refused_with_both_shapes():
    model = convert_to_sal(
        BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, num_labels=2,
        )),
        SALConfig(method="dfa"),
    ).train()
    controller = get_controller(model)
    embeddings = model.bert.embeddings
    controller.set_sequence_mask(torch.ones(2, 4, dtype=torch.long))

    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5, 16\)"):
        embeddings(input_ids=torch.randint(1, VOCAB, (2, 5)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_generation_routes_the_new_tokens_with_their_columns_of_the_mask(arch):
    # The mask covers the cached tokens too; the routers must get the new tokens' columns.
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2,
                                           n_positions=32, pad_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
            pad_token_id=0,
        ))
    model = convert_to_sal(model, SALConfig(num_areas=AREAS, routing_dim=8)).eval()
    seen = []
    router = next(iter(get_controller(model).routers.values()))
    router.register_forward_pre_hook(lambda module, args: seen.append(module.sequence_mask))
    input_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])  # left padding
    attention_mask = (input_ids != 0).long()

    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3,
                               do_sample=False, pad_token_id=0)

    assert generated.shape == (2, 7)
    assert torch.equal(seen[0], attention_mask)
    assert [tuple(mask.shape) for mask in seen[1:]] == [(2, 1), (2, 1)]
    assert all(torch.equal(mask, torch.ones(2, 1, dtype=torch.long)) for mask in seen[1:])
