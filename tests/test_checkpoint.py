"""Checkpoints: save_pretrained -> AutoSAL*.from_pretrained, by path and through the HF cache."""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
    conversion_mapping,
)
from transformers.core_model_loading import Transpose, WeightConverter

import sal_hf
from sal_hf import (
    AutoSALModelForCausalLM,
    AutoSALModelForImageClassification,
    AutoSALModelForSequenceClassification,
    MLPClassifierConfig,
    MLPForImageClassification,
    SALCheckpointError,
    SALConfig,
    convert_to_sal,
)

REPO_ID = "sal-org/tiny-mlp"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Offline mode as huggingface_hub sees it (it reads HF_HUB_OFFLINE at import), and no socket
    may connect anywhere."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _scramble(model: torch.nn.Module) -> torch.nn.Module:
    """Give every saved tensor a distinct non-default value, as after training."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model.eval()


def _mlp(**sal_options) -> MLPForImageClassification:
    config = MLPClassifierConfig(input_size=12, hidden_size=8, num_layers=2, num_labels=3)
    model = MLPForImageClassification(config)
    return _scramble(convert_to_sal(model, SALConfig(num_areas=4, routing_dim=4, **sal_options)))


def _pixels() -> torch.Tensor:
    return torch.randn(6, 12, generator=torch.Generator().manual_seed(2))


def _frozen_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    persistent = model.state_dict().keys()
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def _assert_same_tensors(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected, actual = original.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def _lay_out_cache(cache: Path, folder: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """Place `folder` in `cache` as huggingface_hub does: a snapshot and `refs/main`."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, storage / "snapshots" / commit)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage


@pytest.fixture
def saved(tmp_path) -> tuple[MLPForImageClassification, Path]:
    model = _mlp()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    return model, folder


def test_save_pretrained_writes_config_with_sal_settings_and_safetensors_only(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["sal_config"] == SALConfig(num_areas=4, routing_dim=4).to_dict()
    assert config["sal_architecture"] == "mlp_classifier"
    assert config["architectures"] == ["MLPForImageClassification"]


def test_save_pretrained_writes_persistent_tensors_but_not_prototypes_or_feedback(saved):
    model, folder = saved
    written = load_file(folder / "model.safetensors")
    assert written.keys() == model.state_dict().keys()
    assert "sal_controller.routers.0.running_mean" in written
    assert not any("prototypes" in key or "feedback" in key for key in written)


def test_load_by_path_round_trips_every_tensor_bit_for_bit(saved):
    model, folder = saved
    loaded = AutoSALModelForImageClassification.from_pretrained(folder)
    _assert_same_tensors(loaded, model)


def test_load_by_path_regenerates_the_original_frozen_buffers(saved):
    model, folder = saved
    loaded = AutoSALModelForImageClassification.from_pretrained(folder)
    original = _frozen_buffers(model)
    regenerated = _frozen_buffers(loaded)
    assert regenerated.keys() == original.keys()
    assert any("prototypes" in name for name in original)
    assert any("feedback.region_" in name for name in original)
    for name, buffer in original.items():
        assert torch.equal(regenerated[name], buffer), name


def test_loaded_model_is_in_eval_mode_and_gives_the_original_outputs(saved):
    model, folder = saved
    loaded = AutoSALModelForImageClassification.from_pretrained(folder)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_pixels()).logits, model(_pixels()).logits)


def test_bfloat16_model_round_trips_with_the_saved_dtypes(tmp_path):
    model = _mlp().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoSALModelForImageClassification.from_pretrained(tmp_path)
    _assert_same_tensors(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(_pixels()).logits, model(_pixels()).logits)


def test_dtype_casts_the_base_weights_and_keeps_routers_float32(saved):
    model, folder = saved
    loaded = AutoSALModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16)
    assert loaded.layers[0].dense.weight.dtype == torch.bfloat16
    assert loaded.classifier.weight.dtype == torch.bfloat16
    assert loaded.sal_controller.routers["0"].projection.weight.dtype == torch.float32
    assert torch.equal(loaded.layers[0].dense.weight, model.layers[0].dense.weight.bfloat16())


def test_sharded_checkpoint_loads(tmp_path):
    model = _mlp()
    model.save_pretrained(tmp_path, max_shard_size="1KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_tensors(AutoSALModelForImageClassification.from_pretrained(tmp_path), model)


def test_sharded_checkpoint_missing_a_shard_is_a_clear_error(tmp_path):
    _mlp().save_pretrained(tmp_path, max_shard_size="1KB")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(SALCheckpointError, match="model-00002-of-00003.*incomplete"):
        AutoSALModelForImageClassification.from_pretrained(tmp_path)


def test_load_by_repo_id_through_an_offline_cache_dir(saved, tmp_path):
    model, folder = saved
    _lay_out_cache(tmp_path / "cache", folder, REPO_ID)
    loaded = AutoSALModelForImageClassification.from_pretrained(
        REPO_ID, cache_dir=tmp_path / "cache"
    )
    _assert_same_tensors(loaded, model)


def test_load_by_repo_id_through_the_default_cache(saved, tmp_path, monkeypatch):
    model, folder = saved
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the cache location at import; this is the value it then uses.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _lay_out_cache(cache, folder, REPO_ID)
    loaded = AutoSALModelForImageClassification.from_pretrained(REPO_ID, local_files_only=True)
    _assert_same_tensors(loaded, model)


def test_revision_selects_the_snapshot_of_that_commit(saved, tmp_path):
    model, folder = saved
    storage = _lay_out_cache(tmp_path / "cache", folder, REPO_ID, commit=OTHER_COMMIT)
    newer = _mlp(seed=5)
    newer.save_pretrained(storage / "snapshots" / COMMIT)
    (storage / "refs" / "main").write_text(COMMIT)
    loaded = AutoSALModelForImageClassification.from_pretrained(
        REPO_ID, revision=OTHER_COMMIT, cache_dir=tmp_path / "cache"
    )
    assert loaded.config.sal_config["seed"] == 0


def test_repo_id_missing_from_the_offline_cache_is_a_clear_error(tmp_path):
    with pytest.raises(SALCheckpointError, match="sal-org/absent.*neither a local folder"):
        AutoSALModelForImageClassification.from_pretrained(
            "sal-org/absent", cache_dir=tmp_path / "empty"
        )


def test_truncated_weights_are_a_clear_error_naming_the_file(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(SALCheckpointError, match="model.safetensors.*truncated or corrupt"):
        AutoSALModelForImageClassification.from_pretrained(folder)


def test_weights_whose_shapes_disagree_with_the_config_name_the_key_and_both_shapes(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["sal_config"]["num_areas"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SALCheckpointError) as error:
        AutoSALModelForImageClassification.from_pretrained(folder)
    message = str(error.value)
    assert "config and the weights disagree" in message
    assert "'layers.0.dense.weight' is [4, 8, 12] in model.safetensors" in message
    assert "the config gives [3, 8, 12]" in message


def test_a_config_that_is_not_json_is_a_clear_error_naming_the_file(saved):
    _, folder = saved
    (folder / "config.json").write_text('{"model_type": "mlp_classifier",')
    with pytest.raises(SALCheckpointError, match=r"config\.json cannot be read"):
        AutoSALModelForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize("seed", [-1, 2**40])
def test_a_saved_seed_torch_cannot_use_is_a_clear_error(saved, seed):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["sal_config"]["seed"] = seed
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SALCheckpointError, match=r"sal_config in .*config\.json is invalid.*seed"):
        AutoSALModelForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize(
    "edit, message",
    [(lambda config: None, "cannot be read"),
     (lambda config: {**config, "hidden_size": 0}, "(?s)cannot be read.*hidden_size must be >= 1"),
     (lambda config: {**config, "sal_config": {**config["sal_config"], "feedback_blocks": 2}},
      "cannot be built")],
    ids=["null", "bad-model-field", "blocks-without-rank"],
)
def test_a_config_that_describes_no_buildable_model_is_a_checkpoint_error(saved, edit, message):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(SALCheckpointError, match=message):
        AutoSALModelForImageClassification.from_pretrained(folder)


def test_weights_missing_a_key_are_a_clear_error_naming_it(saved):
    _, folder = saved
    weights = load_file(folder / "model.safetensors")
    del weights["sal_controller.routers.1.running_mean"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SALCheckpointError, match="missing keys.*routers.1.running_mean"):
        AutoSALModelForImageClassification.from_pretrained(folder)


def test_pickled_weights_are_refused_without_being_read(saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    # Not a valid pickle: any attempt to unpickle it would fail with another error.
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(SALCheckpointError, match=r"pytorch_model\.bin.*never unpickles.*safet"):
        AutoSALModelForImageClassification.from_pretrained(folder)


def test_a_checkpoint_of_a_plain_model_is_not_a_sal_checkpoint(tmp_path):
    config = MLPClassifierConfig(input_size=12, hidden_size=8, num_layers=2, num_labels=3)
    MLPForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(SALCheckpointError, match="not a SAL checkpoint.*convert_to_sal"):
        AutoSALModelForImageClassification.from_pretrained(tmp_path)


def test_the_wrong_auto_class_is_a_clear_error_naming_the_right_one(saved):
    _, folder = saved
    with pytest.raises(SALCheckpointError) as error:
        AutoSALModelForCausalLM.from_pretrained(folder)
    message = str(error.value)
    assert "MLPForImageClassification" in message
    assert "AutoSALModelForCausalLM does not build" in message
    assert "use AutoSALModelForImageClassification" in message


def test_auto_classes_cannot_be_instantiated():
    with pytest.raises(OSError, match="from_pretrained"):
        AutoSALModelForSequenceClassification()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    return _scramble(convert_to_sal(model, SALConfig(num_areas=2, routing_dim=4)))


def test_gpt2_checkpoint_leaves_out_the_tied_lm_head(tiny_gpt2, tmp_path):
    tiny_gpt2.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in written
    assert "transformer.wte.weight" in written
    assert "transformer.h.0.mlp.c_fc.weight" in written


def test_gpt2_round_trips_bit_for_bit_with_its_head_tied_again(tiny_gpt2, tmp_path):
    tiny_gpt2.save_pretrained(tmp_path)
    loaded = AutoSALModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_tensors(loaded, tiny_gpt2)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    input_ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, tiny_gpt2(input_ids).logits)


def test_gpt2_classifier_through_the_causal_lm_class_is_refused(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, num_labels=2)
    model = GPT2ForSequenceClassification(config)
    convert_to_sal(model, SALConfig(num_areas=2, routing_dim=4)).save_pretrained(tmp_path)
    with pytest.raises(SALCheckpointError, match="use AutoSALModelForSequenceClassification"):
        AutoSALModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoSALModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is GPT2ForSequenceClassification


@pytest.fixture
def tiny_vit() -> ViTForImageClassification:
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=3,
    )
    model = ViTForImageClassification(config)
    return _scramble(convert_to_sal(model, SALConfig(num_areas=4, routing_dim=4)))


def _images() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))


@pytest.fixture
def extra_converter(monkeypatch):
    """Add a weight converter to transformers' conversion mapping, for saving and loading."""
    original = conversion_mapping.get_model_conversion_mapping

    def install(converter: WeightConverter) -> None:
        def with_converter(model, *args, **kwargs):
            return [*original(model, *args, **kwargs), copy.deepcopy(converter)]

        monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", with_converter)

    return install


def test_vit_checkpoint_holds_area_weights_under_the_legacy_names(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    layer = "vit.encoder.layer.1"
    fc1 = tiny_vit.vit.layers[1].mlp.fc1.weight
    assert torch.equal(written[f"{layer}.intermediate.dense.weight"], fc1)
    assert written[f"{layer}.output.dense.bias"].shape == (4, 16)
    assert f"{layer}.attention.attention.query.weight" in written
    assert not any(key.startswith("vit.layers.") for key in written)
    sal_keys = {key for key in tiny_vit.state_dict() if key.startswith("sal_controller.")}
    assert sal_keys == {key for key in written if key.startswith("sal_controller.")}


def test_vit_round_trips_bit_for_bit_through_the_legacy_names(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path)
    loaded = AutoSALModelForImageClassification.from_pretrained(tmp_path)
    _assert_same_tensors(loaded, tiny_vit)
    with torch.no_grad():
        assert torch.equal(loaded(_images()).logits, tiny_vit(_images()).logits)


def test_vit_saved_under_its_module_names_loads_too(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path, save_original_format=False)
    assert "vit.layers.0.mlp.fc1.weight" in load_file(tmp_path / "model.safetensors")
    _assert_same_tensors(AutoSALModelForImageClassification.from_pretrained(tmp_path), tiny_vit)


@pytest.mark.parametrize("save_original_format", [True, False])
def test_loaded_vit_saves_again_under_the_names_it_was_loaded_from(
    tiny_vit, tmp_path, save_original_format
):
    tiny_vit.save_pretrained(tmp_path / "first", save_original_format=save_original_format)
    loaded = AutoSALModelForImageClassification.from_pretrained(tmp_path / "first")
    loaded.save_pretrained(tmp_path / "second")
    first = load_file(tmp_path / "first" / "model.safetensors")
    second = load_file(tmp_path / "second" / "model.safetensors")
    assert second.keys() == first.keys()
    assert all(torch.equal(second[key], first[key]) for key in first)


def test_vit_shape_mismatch_names_the_model_key_and_the_saved_one(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sal_config"]["num_areas"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SALCheckpointError) as error:
        AutoSALModelForImageClassification.from_pretrained(tmp_path)
    assert (
        "'vit.layers.0.mlp.fc1.weight' is [4, 32, 16] in model.safetensors "
        "(as 'vit.encoder.layer.0.intermediate.dense.weight') but the config gives [3, 32, 16]"
    ) in str(error.value)


def test_a_converter_on_a_plain_weight_is_applied_as_transformers_applies_it(
    tiny_vit, tmp_path, extra_converter
):
    extra_converter(WeightConverter("classifier.weight_t", "classifier.weight", [Transpose()]))
    tiny_vit.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    assert torch.equal(written["classifier.weight_t"], tiny_vit.classifier.weight.T)
    _assert_same_tensors(AutoSALModelForImageClassification.from_pretrained(tmp_path), tiny_vit)


def test_a_converter_that_would_reshape_area_weights_is_refused(
    tiny_vit, tmp_path, extra_converter
):
    extra_converter(WeightConverter("intermediate.dense_t.weight", "mlp.fc1.weight", [Transpose()]))
    tiny_vit.save_pretrained(tmp_path)
    # Transposed as if [out, in]: the areas end up in the middle, [32, 4, 16].
    written = load_file(tmp_path / "model.safetensors")
    assert written["vit.encoder.layer.0.intermediate.dense_t.weight"].shape == (32, 4, 16)
    with pytest.raises(SALCheckpointError) as error:
        AutoSALModelForImageClassification.from_pretrained(tmp_path)
    message = str(error.value)
    assert "into the area weights ['vit.layers.0.mlp.fc1.weight'] through Transpose" in message
    assert "save_pretrained(folder, save_original_format=False)" in message


def test_prepare_for_hub_saves_area_weights_unconverted_where_a_converter_would_reshape_them(
    tiny_vit, tmp_path, extra_converter
):
    extra_converter(WeightConverter("intermediate.dense_t.weight", "mlp.fc1.weight", [Transpose()]))
    folder = sal_hf.prepare_for_hub(tiny_vit, tmp_path / "hub")
    assert "vit.layers.0.mlp.fc1.weight" in load_file(folder / "model.safetensors")
    _assert_same_tensors(AutoSALModelForImageClassification.from_pretrained(folder), tiny_vit)


def test_parameter_counts_count_one_area_per_area_layer_as_active():
    # Areas: 4 x (8x12 + 8) and 4 x (8x8 + 8); classifier 8x3 + 3; routers 12x4 + 4, 8x4 + 4.
    assert sal_hf.parameter_counts(_mlp()) == {"total": 819, "active": 291}


def test_model_card_names_architecture_settings_counts_and_how_to_load(tmp_path):
    path = sal_hf.write_model_card(_mlp(), tmp_path, repo_id=REPO_ID)
    card = path.read_text()
    assert path == tmp_path / "README.md"
    assert card.startswith("---\n")
    assert "library_name: sal-hf" in card
    assert "pipeline_tag: image-classification" in card
    assert "# SAL MLPForImageClassification" in card
    assert "| total | 819 |" in card
    assert "| active per sample | 291 |" in card
    assert "| `num_areas` | `4` |" in card
    assert '| `routing` | `"sample"` |' in card
    assert "| `feedback_rank` | `null` |" in card
    assert "from sal_hf import AutoSALModelForImageClassification" in card
    assert f'AutoSALModelForImageClassification.from_pretrained("{REPO_ID}")' in card


def test_prepare_for_hub_writes_a_folder_that_loads_back(tmp_path):
    model = _mlp()
    folder = sal_hf.prepare_for_hub(model, tmp_path / "hub", repo_id=REPO_ID)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    _assert_same_tensors(AutoSALModelForImageClassification.from_pretrained(folder), model)


def test_model_card_of_a_model_that_is_not_sal_is_refused(tmp_path):
    config = MLPClassifierConfig(input_size=12, hidden_size=8, num_layers=2, num_labels=3)
    with pytest.raises(ValueError, match="not a SAL model.*convert_to_sal"):
        sal_hf.write_model_card(MLPForImageClassification(config), tmp_path)
