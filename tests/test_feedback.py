"""Compressed feedback: the shared compression `e @ R`, dense or block-diagonal."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sal_hf import DirectFeedback, SALConfig, convert_to_sal, get_controller
from sal_hf.conversion import AUTO_FEEDBACK_BLOCKS, AUTO_FEEDBACK_RANK

OUTPUTS, RANK, WIDTH = 10, 6, 4


def _block_diagonal(feedback: DirectFeedback) -> torch.Tensor:
    """The full `[num_outputs, rank]` matrix that the stored diagonal blocks stand for."""
    stored = feedback.compression  # [num_outputs, rank / blocks]
    per_block = feedback.rank // feedback.blocks
    full = torch.zeros(feedback.num_outputs, feedback.rank, dtype=stored.dtype)
    for block in range(feedback.blocks):
        start = block * feedback.num_outputs // feedback.blocks
        stop = (block + 1) * feedback.num_outputs // feedback.blocks
        columns = slice(block * per_block, (block + 1) * per_block)
        full[start:stop, columns] = stored[start:stop]
    return full


@pytest.mark.parametrize("blocks", [1, 2, 3, 6])
def test_compression_equals_the_error_times_the_block_diagonal_matrix(blocks):
    # 10 outputs in 3 blocks: slices of 3, 3 and 4 outputs, to 2 coordinates each.
    feedback = DirectFeedback(OUTPUTS, [WIDTH], [1], rank=RANK, blocks=blocks, seed=3)
    error = torch.randn(2, 5, OUTPUTS, dtype=torch.float64)
    expected = error @ _block_diagonal(feedback).double()
    torch.testing.assert_close(feedback.compress(error), expected, rtol=1e-12, atol=1e-12)


def test_block_diagonal_compression_keeps_the_scale_of_the_dense_one():
    # Entries of a block have variance blocks / num_outputs, so E|e R|^2 = rank/n |e|^2 either way.
    outputs, rank = 4096, 256
    error = torch.randn(64, outputs)
    norms = {}
    for blocks in (1, 8):
        feedback = DirectFeedback(outputs, [WIDTH], [1], rank=rank, blocks=blocks, seed=0)
        norms[blocks] = feedback.compress(error).pow(2).sum() / error.pow(2).sum()
    for value in norms.values():
        assert value == pytest.approx(rank / outputs, rel=0.05)


def test_blocks_without_a_compression_are_refused():
    with pytest.raises(ValueError, match="feedback_blocks=2 splits the compression"):
        DirectFeedback(OUTPUTS, [WIDTH], [1], blocks=2)


def test_vocabulary_sized_output_gets_block_diagonal_compression_by_default():
    config = GPT2Config(vocab_size=4096, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = convert_to_sal(GPT2LMHeadModel(config), SALConfig(num_areas=2))
    feedback = get_controller(model).feedback
    assert (feedback.rank, feedback.blocks) == (AUTO_FEEDBACK_RANK, AUTO_FEEDBACK_BLOCKS)
    assert feedback.compression.shape == (4096, AUTO_FEEDBACK_RANK // AUTO_FEEDBACK_BLOCKS)
    assert model.config.sal_config["feedback_blocks"] == AUTO_FEEDBACK_BLOCKS


def test_blocks_set_by_the_user_are_kept_when_the_rank_is_chosen():
    config = GPT2Config(vocab_size=4096, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = convert_to_sal(GPT2LMHeadModel(config), SALConfig(num_areas=2, feedback_blocks=2))
    assert get_controller(model).feedback.blocks == 2


def test_a_failed_conversion_leaves_the_model_as_it_was():
    config = GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # 97 outputs get no compression, so there is nothing to split into blocks.
    with pytest.raises(ValueError, match="feedback_blocks=2 splits the compression"):
        convert_to_sal(model, SALConfig(num_areas=2, feedback_blocks=2))
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert get_controller(convert_to_sal(model, SALConfig(num_areas=2))) is not None


def test_blocks_that_do_not_divide_the_chosen_rank_say_it_was_chosen():
    config = GPT2Config(vocab_size=2000, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    with pytest.raises(ValueError, match="chose as 256 for 2000 outputs"):
        convert_to_sal(GPT2LMHeadModel(config), SALConfig(num_areas=2, feedback_blocks=3))


def test_a_sample_level_error_reaches_only_the_tokens_the_mask_keeps():
    feedback = DirectFeedback(3, [4], [1], seed=5).double()
    signal = torch.randn(2, 3, dtype=torch.float64)  # one error per sample
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    delta = feedback.region_signal(signal, 0, None, torch.Size([2, 3, 4]), mask)

    per_sample = signal @ feedback.matrices(0)[0]  # [2, 4]
    expected = per_sample[:, None, :] * mask[:, :, None].double()
    assert torch.equal(delta, expected)


def test_a_token_level_error_is_not_masked_again():
    # A token classifier's error is per token already: a padding token's error is its own.
    feedback = DirectFeedback(3, [4], [1], seed=5).double()
    signal = torch.randn(2, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    delta = feedback.region_signal(signal, 0, None, torch.Size([2, 3, 4]), mask)

    assert torch.equal(delta, signal @ feedback.matrices(0)[0])
