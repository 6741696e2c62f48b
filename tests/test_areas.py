"""Area layers: upcycling a dense layer, grouped products, and `AreaSort`, which groups a
token-wise block's rows once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal
from sal_hf.areas import AreaLinear, AreaSort

BATCH, SEQ, WIDTH, HIDDEN, AREAS = 3, 5, 6, 10, 4


class TokenWiseMLP(nn.Module):
    """Two area layers around an activation: every token is mapped on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.up = AreaLinear(WIDTH, HIDDEN, AREAS)
        self.down = AreaLinear(HIDDEN, WIDTH, AREAS)
        self.seen_shapes: list[tuple[int, ...]] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.seen_shapes.append(tuple(hidden_states.shape))
        return self.down(torch.relu(self.up(hidden_states)))


def _mlp_pair() -> tuple[TokenWiseMLP, TokenWiseMLP]:
    torch.manual_seed(0)
    plain, sorted_once = TokenWiseMLP(), TokenWiseMLP()
    sorted_once.load_state_dict(plain.state_dict())
    AreaSort([sorted_once.up, sorted_once.down]).install(sorted_once)
    return plain, sorted_once


def _run(mlp: TokenWiseMLP, inputs: torch.Tensor, areas: torch.Tensor):
    inputs = inputs.clone().requires_grad_(True)
    for layer in (mlp.up, mlp.down):
        layer.pending_areas = areas
    output = mlp(inputs)
    output.backward(torch.arange(output.numel(), dtype=output.dtype).reshape(output.shape))
    return output, inputs.grad, mlp.up.weight.grad, mlp.down.bias.grad


@pytest.mark.parametrize("areas_shape", [(BATCH,), (BATCH, SEQ)], ids=["sample", "token"])
def test_sorting_once_gives_bit_for_bit_the_per_layer_results(areas_shape):
    plain, sorted_once = _mlp_pair()
    inputs = torch.randn(BATCH, SEQ, WIDTH)
    areas = torch.randint(0, AREAS, areas_shape)
    for expected, actual in zip(_run(plain, inputs, areas), _run(sorted_once, inputs, areas),
                                strict=True):
        assert torch.equal(actual, expected)


def test_the_block_sees_its_rows_grouped_by_area_and_returns_the_original_shape():
    _, sorted_once = _mlp_pair()
    inputs = torch.randn(BATCH, SEQ, WIDTH)
    areas = torch.tensor([[3, 0, 3, 1, 0], [2, 2, 0, 1, 3], [0, 0, 0, 0, 1]])
    output, *_ = _run(sorted_once, inputs, areas)
    assert sorted_once.seen_shapes == [(BATCH * SEQ, WIDTH)]
    assert output.shape == (BATCH, SEQ, WIDTH)
    assert sorted_once.up.pending_groups is None  # cleared on exit


def test_an_area_without_rows_gets_a_zero_gradient():
    _, sorted_once = _mlp_pair()
    areas = torch.tensor([0, 2, 2])  # areas 1 and 3 receive nothing
    _, _, up_grad, down_bias_grad = _run(sorted_once, torch.randn(BATCH, SEQ, WIDTH), areas)
    for area in (1, 3):
        assert torch.count_nonzero(up_grad[area]) == 0
        assert torch.count_nonzero(down_bias_grad[area]) == 0
    assert torch.count_nonzero(up_grad[2]) > 0


def test_a_block_that_mixes_rows_is_refused_with_the_expected_shape():
    layer = AreaLinear(WIDTH, HIDDEN, AREAS)
    layer.pending_groups = (2, 0, 1, 1)
    with pytest.raises(ValueError, match=r"must be \[4, 6\].*got \(2, 2, 6\)"):
        layer(torch.randn(2, 2, WIDTH))


def _requires_grad(layer: AreaLinear) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in layer.named_parameters()}


def test_upcycling_a_parameter_keeps_its_requires_grad_for_areas_and_shared_path():
    dense = nn.Linear(WIDTH, HIDDEN)
    dense.weight.requires_grad_(False)  # bias-only fine-tuning: the weight frozen, bias trained
    layer = AreaLinear.from_dense(dense.weight, dense.bias, AREAS, shared_path=True)
    assert _requires_grad(layer) == {
        "weight": False, "bias": True, "shared.weight": False, "shared.bias": True,
    }


def test_upcycling_plain_tensors_gives_trainable_areas():
    dense = nn.Linear(WIDTH, HIDDEN).requires_grad_(False)
    layer = AreaLinear.from_dense(dense.weight.data, dense.bias.data, AREAS, shared_path=True)
    assert all(_requires_grad(layer).values())


def _llama() -> tuple[nn.Module, str, str]:
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config), "model.layers.0.mlp", "model.layers.1.mlp"


def _gpt2() -> tuple[nn.Module, str, str]:
    config = GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16)
    return GPT2LMHeadModel(config), "transformer.h.0.mlp", "transformer.h.1.mlp"


def _mlp_classifier() -> tuple[nn.Module, str, str]:
    config = MLPClassifierConfig(input_size=6, hidden_size=8, num_layers=2, num_labels=3)
    return MLPForImageClassification(config), "layers.0", "layers.1"


@pytest.mark.parametrize("build", [_llama, _gpt2, _mlp_classifier], ids=["llama", "gpt2", "mlp"])
def test_a_frozen_dense_layer_converts_to_a_frozen_area_layer(build):
    model, frozen, trained = build()
    model.get_submodule(frozen).requires_grad_(False)
    convert_to_sal(model, SALConfig(num_areas=2, routing_dim=4, shared_path=True))
    for name, expected in ((frozen, False), (trained, True)):
        area_layers = [m for m in model.get_submodule(name).modules() if isinstance(m, AreaLinear)]
        assert area_layers, name
        for layer in area_layers:
            assert set(_requires_grad(layer).values()) == {expected}, name
