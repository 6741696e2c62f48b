"""The transformer recipes: one real `accelerate launch` run each, their results and checkpoints.

Each run is tiny (a few rows or characters, 3 steps, narrow models): what is checked is that the
recipe runs end to end under Accelerate, reports every documented field and saves a checkpoint
that the matching AutoSAL class loads back.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_recipe
from transformers import AutoTokenizer

from sal_hf import (
    AutoSALModelForCausalLM,
    AutoSALModelForImageClassification,
    AutoSALModelForSequenceClassification,
)
from sal_hf.conversion import AUTO_FEEDBACK_RANK

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
COMMON_FIELDS = {
    "method", "num_areas", "routing", "train_runtime_s", "step_time_ms", "peak_memory_mb",
    "area_usage", "total_parameters", "active_parameters", "seed", "sal_config",
    "distributed_type", "zero_stage", "num_processes", "learning_curves",
}
SMOKE = ["--max_steps", "3", "--eval_strategy", "no", "--logging_steps", "1",
         "--disable_tqdm", "true"]


def start(recipe: str, output_dir: Path, *arguments: str) -> subprocess.Popen:
    # One thread each: the three runs share the machine's cores.
    command = [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu.yaml",
               "--num_cpu_threads_per_process", "1", f"recipes/{recipe}.py", *arguments,
               *SMOKE, "--output_dir", str(output_dir)]
    return subprocess.Popen(command, cwd=ROOT)


def finished(process: subprocess.Popen, output_dir: Path) -> tuple[Path, dict]:
    assert process.wait(timeout=300) == 0, f"{process.args} failed"
    return output_dir, json.loads((output_dir / "results.json").read_text())


def check_common(results: dict, output_dir: Path, method: str, num_areas: int) -> None:
    assert COMMON_FIELDS <= set(results), COMMON_FIELDS - set(results)
    assert (results["method"], results["num_areas"]) == (method, num_areas)
    assert results["distributed_type"] == "NO" and results["num_processes"] == 1
    assert results["active_parameters"] < results["total_parameters"]
    assert results["step_time_ms"] > 0 and results["peak_memory_mb"] > 0
    assert (output_dir / results["learning_curves"]).read_bytes()[:4] == b"\x89PNG"
    for fractions in results["area_usage"].values():
        assert len(fractions) == num_areas and sum(fractions) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The three smoke runs, started together: most of each is start-up, not computation."""
    runs = {
        "text_classifier": ("finetune_text_classifier", [
            "--method", "sal", "--num_areas", "2", "--limit", "48", "--max_length", "24",
            "--per_device_train_batch_size", "8"]),
        "causal_lm": ("train_causal_lm", [
            "--arch", "gpt2", "--num_layers", "2", "--hidden_size", "32", "--num_heads", "2",
            "--corpus", "shakespeare", "--limit", "150000", "--vocab_size", "1100",
            "--block_size", "32", "--method", "sal", "--num_areas", "2", "--routing", "token",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "64"]),
        "vit": ("train_vit", [
            "--dataset", "mnist", "--patch_size", "7", "--num_layers", "2", "--hidden_size",
            "16", "--num_heads", "2", "--method", "sal", "--num_areas", "2", "--limit", "64",
            "--per_device_train_batch_size", "16"]),
    }
    started = {}
    for name, (recipe, arguments) in runs.items():
        output_dir = tmp_path_factory.mktemp(name)
        started[name] = (start(recipe, output_dir, *arguments), output_dir)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def text_classifier_run(launched):
    return finished(*launched["text_classifier"])


@pytest.fixture(scope="module")
def causal_lm_run(launched):
    return finished(*launched["causal_lm"])


@pytest.fixture(scope="module")
def vit_run(launched):
    return finished(*launched["vit"])


def test_text_classifier_run_reports_test_accuracy(text_classifier_run):
    output_dir, results = text_classifier_run
    check_common(results, output_dir, "sal", 2)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["model"] == "all-MiniLM-L6-v2" and results["tokens_per_second"] > 0
    assert set(results["area_usage"]) == {f"bert.encoder.layer.{i}" for i in range(6)}


def test_text_classifier_checkpoint_loads_back_with_its_tokenizer(text_classifier_run):
    output_dir, _ = text_classifier_run
    model = AutoSALModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer(["a triumph", "a mess from start to finish"], padding=True,
                       return_tensors="pt")
    assert model(**inputs).logits.shape == (2, 2)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}


def test_causal_lm_run_reports_perplexity_throughput_and_memory(causal_lm_run):
    output_dir, results = causal_lm_run
    check_common(results, output_dir, "sal", 2)
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["tokens_per_second"] > 0
    assert results["train_tokens"] == 3 * 4 * 32
    assert results["vocab_size"] == 1100
    assert results["area_learning_rate_scale"] == pytest.approx(2**-0.5)


def test_causal_lm_vocabulary_above_1024_gets_compressed_feedback(causal_lm_run):
    _, results = causal_lm_run
    assert results["sal_config"]["feedback_rank"] == AUTO_FEEDBACK_RANK


def test_causal_lm_checkpoint_loads_back_with_its_tokenizer(causal_lm_run):
    output_dir, _ = causal_lm_run
    model = AutoSALModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    text = "To be, or not to be: that is the question.\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 1100)


def test_vit_run_reports_test_accuracy_and_loads_back(vit_run):
    output_dir, results = vit_run
    check_common(results, output_dir, "sal", 2)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    model = AutoSALModelForImageClassification.from_pretrained(output_dir)
    assert model(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)


def test_bpe_tokenizer_is_the_same_when_trained_twice():
    recipe = load_recipe("train_causal_lm")
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 20
    first = recipe.train_tokenizer(text, "bpe", 300)
    second = recipe.train_tokenizer(text, "bpe", 300)
    assert first.get_vocab() == second.get_vocab()
    assert first.decode(first(text).input_ids) == text


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unk():
    recipe = load_recipe("train_causal_lm")
    tokenizer = recipe.train_tokenizer("abc\n ", "char", vocab_size=0)
    ids = tokenizer("ab c\n").input_ids
    assert len(ids) == 5 and tokenizer.decode(ids) == "ab c\n"
    assert tokenizer("z").input_ids == [tokenizer.unk_token_id]


def test_blocks_are_consecutive_and_the_partial_block_is_dropped():
    recipe = load_recipe("train_causal_lm")
    tokenizer = recipe.train_tokenizer("abcdefg", "char", vocab_size=0)
    blocks = recipe.to_blocks("abcdefg", tokenizer, block_size=3)[:]
    assert blocks["input_ids"].tolist() == tokenizer(["abc", "def"]).input_ids
    assert torch.equal(blocks["labels"], blocks["input_ids"])


def test_llama_is_built_from_its_config_and_converted():
    recipe = load_recipe("train_causal_lm")
    args, _ = recipe.parse_arguments(
        ["--arch", "llama", "--num_layers", "2", "--hidden_size", "32", "--num_heads", "2",
         "--method", "dfa", "--output_dir", "unused"]
    )
    tokenizer = recipe.train_tokenizer("some text to learn from", "char", vocab_size=0)
    model = recipe.build_model(args, tokenizer)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.sal_architecture == "llama" and model.config.intermediate_size == 128


@pytest.mark.parametrize(("method", "given", "areas"),
                         [("sal", [], 4), ("sal", ["--num_areas", "8"], 8), ("bp", [], 1)])
def test_causal_lm_sal_defaults_to_the_benchmarked_four_areas(method, given, areas):
    recipe = load_recipe("train_causal_lm")
    args, _ = recipe.parse_arguments(
        ["--num_layers", "1", "--hidden_size", "16", "--num_heads", "2", "--method", method,
         *given, "--output_dir", "unused"]
    )
    tokenizer = recipe.train_tokenizer("some text to learn from", "char", vocab_size=0)
    model = recipe.build_model(args, tokenizer)
    assert model.sal_controller.sal_config.num_areas == areas


@pytest.mark.parametrize(
    ("recipe_name", "arguments", "message"),
    [
        ("train_causal_lm", ["--arch", "t5"], r"--arch 't5' is unknown.*'gpt2', 'llama'"),
        ("train_causal_lm", ["--corpus", "austen"], r"--corpus 'austen' is unknown.*'kjv'"),
        ("train_vit", ["--patch_size", "5"], r"--patch_size must divide 28"),
        ("train_vit", ["--dataset", "digits"], r"--dataset 'digits' is unknown.*'mnist'"),
    ],
)
def test_bad_choices_are_refused_naming_the_allowed_ones(recipe_name, arguments, message, capsys):
    recipe = load_recipe(recipe_name)
    with pytest.raises(SystemExit):
        recipe.parse_arguments([*arguments, "--output_dir", "unused"])
    assert re.search(message, capsys.readouterr().err)


def test_text_classifier_uses_each_methods_settings_unless_given():
    recipe = load_recipe("finetune_text_classifier")
    assert set(recipe.METHOD_DEFAULTS) == {"bp", "dfa", "sal"}
    for method, settings in recipe.METHOD_DEFAULTS.items():
        _, training_args = recipe.parse_arguments(["--method", method, "--output_dir", "x"])
        assert {name: getattr(training_args, name) for name in settings} == settings
    _, training_args = recipe.parse_arguments(
        ["--method", "sal", "--learning_rate=5e-4", "--head-learning-rate-scale", "2",
         "--output_dir", "x"]
    )
    assert (training_args.learning_rate, training_args.head_learning_rate_scale) == (5e-4, 2.0)


def test_text_classifier_freeze_stops_matching_parameters_and_refuses_a_pattern_matching_none():
    recipe = load_recipe("finetune_text_classifier")
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, 3), "head": torch.nn.Linear(3, 2)})
    recipe.freeze_parameters(model, r"^encoder\.")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "encoder.weight": False, "encoder.bias": False, "head.weight": True, "head.bias": True}
    with pytest.raises(ValueError, match=r"--freeze 'pooler' matches no parameter name"):
        recipe.freeze_parameters(model, "pooler")
    with pytest.raises(ValueError, match=r"--freeze '\.' matches every parameter"):
        recipe.freeze_parameters(model, ".")


def test_text_classifier_refuses_a_freeze_pattern_that_is_no_regex_and_abbreviations(capsys):
    recipe = load_recipe("finetune_text_classifier")
    with pytest.raises(SystemExit):
        recipe.parse_arguments(["--freeze", "((", "--output_dir", "x"])
    assert "--freeze '((' is not a regular expression" in capsys.readouterr().err
    # An abbreviation would escape the method defaults' check: it is refused.
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser.*'--learning_r'"):
        recipe.parse_arguments(["--method", "sal", "--learning_r", "5e-5", "--output_dir", "x"])
