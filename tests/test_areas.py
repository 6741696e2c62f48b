"""Area layers: grouped products, and `AreaSort`, which groups a token-wise block's rows once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
