"""The classifier recipe: a real `accelerate launch` run, its results file, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_recipe

from sal_hf import AutoSALModelForImageClassification

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("digits-sal")
    command = [
        ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu.yaml",
        "recipes/train_classifier.py", "--dataset", "digits", "--method", "sal",
        "--num_areas", "4", "--max_steps", "6", "--limit", "200", "--output_dir",
        str(output_dir), "--disable_tqdm", "true",
    ]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_results_file_has_every_documented_field(digits_run):
    _, results = digits_run
    required = {"dataset", "method", "num_areas", "num_layers", "test_accuracy", "epochs",
                "train_runtime_s", "peak_memory_mb", "area_usage", "distributed_type",
                "zero_stage", "num_processes", "seed"}
    assert required <= set(results)
    assert (results["dataset"], results["method"], results["num_areas"]) == ("digits", "sal", 4)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["distributed_type"] == "NO" and results["num_processes"] == 1


def test_area_usage_is_a_distribution_per_sal_layer(digits_run):
    _, results = digits_run
    assert set(results["area_usage"]) == {"layers.0", "layers.1"}
    for fractions in results["area_usage"].values():
        assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0)


def test_run_writes_learning_curves_and_a_loadable_checkpoint(digits_run):
    output_dir, results = digits_run
    assert (output_dir / results["learning_curves"]).read_bytes()[:4] == b"\x89PNG"
    model = AutoSALModelForImageClassification.from_pretrained(output_dir)
    logits = model(pixel_values=torch.zeros(2, 64)).logits
    assert logits.shape == (2, 10)


def test_paper_recipe_sets_the_papers_optimizer():
    recipe = load_recipe("train_classifier")
    _, training_args = recipe.parse_arguments(
        ["--method", "bp", "--bp_recipe", "paper", "--output_dir", "unused"]
    )
    assert str(training_args.optim).endswith("sgd") or training_args.optim == "sgd"
    assert (training_args.learning_rate, training_args.per_device_train_batch_size,
            training_args.num_train_epochs) == (1e-4, 16, 25)
    assert not training_args.max_grad_norm  # plain SGD, no clipping
    assert training_args.weight_decay == 0.0 and training_args.lr_scheduler_type == "constant"


def test_paper_recipe_with_sal_is_refused(capsys):
    recipe = load_recipe("train_classifier")
    with pytest.raises(SystemExit):
        recipe.parse_arguments(["--method", "sal", "--bp_recipe", "paper", "--output_dir", "x"])
    assert "Use --method bp" in capsys.readouterr().err


def test_unknown_dataset_lists_the_supported_ones(tmp_path):
    recipe = load_recipe("train_classifier")
    with pytest.raises(SystemExit, match=r"--dataset 'cifar10' is unknown.*mnist"):
        recipe.main(["--dataset", "cifar10", "--output_dir", str(tmp_path)])


def test_unknown_method_names_the_allowed_ones(tmp_path):
    recipe = load_recipe("train_classifier")
    with pytest.raises(ValueError, match=r"method='ff' is not supported.*'sal', 'dfa', 'bp'"):
        recipe.main(["--dataset", "digits", "--method", "ff", "--output_dir", str(tmp_path)])


def test_missing_dataset_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAL_HF_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    recipe = load_recipe("train_classifier")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        recipe.main(["--dataset", "fashion_mnist", "--output_dir", str(tmp_path)])


def _write_run(folder: Path, results: dict, history: list[dict]) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return folder


def test_compare_runs_takes_language_model_runs(tmp_path, capsys):
    compare_runs = load_recipe("compare_runs")
    common = {"corpus": "shakespeare", "train_runtime_s": 10.0, "total_parameters": 2_000_000}
    history = [{"epoch": 0.5, "loss": 5.0}, {"epoch": 1.0, "eval_loss": 4.5}]
    sal = _write_run(tmp_path / "sal", {**common, "method": "sal", "num_areas": 4,
                                        "eval_perplexity": 480.5, "step_time_ms": 12.0,
                                        "peak_memory_mb": 110.0,
                                        "area_usage": {"h.0": [0.5, 0.25, 0.25, 0.0]}}, history)
    bp = _write_run(tmp_path / "bp", {**common, "method": "bp", "eval_perplexity": 400.25,
                                      "step_time_ms": 10.0, "peak_memory_mb": 100.0}, history)
    compare_runs.main([str(sal), str(bp), "--plot", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert "| run | val perplexity |" in out
    assert "| SAL-4 | 480.50 |" in out and "| BP | 400.25 |" in out
    assert "SAL-4 vs BP: step time x1.20, process peak memory x1.10" in out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_recipes_hide_only_the_deprecations_of_the_collectives_deepspeed_calls():
    import warnings

    from sal_hf.reporting import quiet_deprecated_collectives

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_deprecated_collectives()
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use ...",
                          FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`torch.distributed.all_reduce` is deprecated. Please use ..."]


def test_compare_runs_takes_the_1b_recipe_mixed_runs_and_odd_files(tmp_path, capsys):
    compare_runs = load_recipe("compare_runs")
    llama = _write_run(tmp_path / "llama-1b", {
        "corpus": "shakespeare", "evaluations": [], "total_parameters": 1_012_609_184,
        "area_usage": {"model.layers.0": {"fractions": [0.5, 0.5], "entropy_ratio": 1.0}},
        "eval_loss": None}, [])
    classifier = _write_run(tmp_path / "mlp", {
        "dataset": "mnist", "method": "sal", "sal_config": {"num_areas": 16},
        "test_accuracy": 0.97, "peak_memory_increase_mb": 60.0, "area_usage": None}, [])
    bp = _write_run(tmp_path / "bp", {"dataset": "mnist", "method": "bp", "test_accuracy": 0.98,
                                      "peak_memory_increase_mb": 20.0,
                                      "area_usage": {"layers.0": [1.0]}}, [])
    compare_runs.main([str(llama), str(classifier), str(bp)])
    out = capsys.readouterr().out
    assert "| llama-1b | n/a |" in out and "model.layers.0: H/logK=1.000" in out
    assert "| SAL-16 | 97.00% |" in out and "| BP | 98.00% |" in out
    assert "SAL-16 vs BP: training memory (rise during training) x3.00" in out
    assert "trained on different data (shakespeare, mnist, mnist)" in out
    (tmp_path / "bp" / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot be read as JSON"):
        compare_runs.main([str(bp)])


def test_learning_curves_of_a_run_too_short_to_log_say_so_without_a_warning(tmp_path):
    import warnings

    from sal_hf.reporting import plot_learning_curves

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_learning_curves({"SAL-4": [{"epoch": 1.0, "train_runtime": 3.0}]},
                                    tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
