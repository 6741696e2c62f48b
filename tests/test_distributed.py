"""SAL under Accelerate with two CPU processes: DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Every run is `accelerate launch --config_file accelerate_configs/cpu_*.yaml` of
`tests/distributed_worker.py` (a few steps of a small SAL MLP on 256 real MNIST rows) with a
timeout after which the launch and all its processes are killed, so a hang fails the test
instead of blocking the suite. Runs are launched once, when a test first needs them, and shared
by the tests of this module.

Tolerance of the trajectory tests: `TRAJECTORY_RTOL = 1e-5`. With the same global batch, two
processes differ from one only in the order of fp32 sums (each rank sums half the batch before
the all-reduce; the routers' running mean adds two halves). Measured over 6 AdamW steps: at most
2.3e-7 relative on the loss, 1e-6 absolute on `task_loss` (which SALTrainer logs rounded to 6
decimals). The tolerance, about 4e-5 on losses near 4, leaves a 40x margin and stays two orders
of magnitude below the smallest real fault measured: ranks computing the balance term on their
own halves, or a different micro-batch split under gradient accumulation, move the loss by
3e-3 after one step and by 1e-2 to 2e-1 after a few.

Most trajectory runs set `balance_loss_weight=0` to isolate the rest of the update; one run with
the balance term checks that the term is computed over the global batch (before it was, a
per-rank balance term put the task loss 0.19 apart after 4 steps). Every run trains the area
weights at SAL's default rate (1/sqrt(4) of the learning rate), and the accumulation pair also
the head at 2x, so the trajectory tests also check that each set-up steps with those rates
(ZeRO once applied the scales twice: area weights at 1/4, the loss 2e-2 apart after one step).

The 1B recipe's combination, a Llama SAL model with streamed regions (activation checkpointing)
under ZeRO-3, runs at a tiny size in `tests/streamed_llama_worker.py`, with the recipe's SGD at
0.5, `max_grad_norm` 1.0 and router settings, against a one-process reference trained in the
test process. Measured against one process, the loss stayed within 1.1e-7 (relative) over 6
steps; `LLAMA_STEPS = 3` keeps the run short. (With SALConfig's router settings, which the recipe
used before, routing collapsed onto one area after the first step and the loss was 2.9e-6 apart
at step 4, 9.1e-6 at step 6.) After 3 steps, each decoder-layer weight's change differs from one
process's by at most 1.2e-5 of its norm, hence `BODY_RTOL = 1e-3`; a layer updated at another
rate, or not at all, is off by 0.5 to 1.

FSDP is not among the set-ups: Accelerate runs FSDP only on GPU-type processes (see the
`# Limitation:` in accelerate_configs/fsdp.yaml); tests/test_fsdp.py runs FSDP2 through torch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import streamed_llama_worker
import torch
from helpers import free_port, kill_tree
from safetensors import safe_open
from safetensors.torch import load_file

from sal_hf.checkpoint import AutoSALModelForImageClassification
from sal_hf.export import _for_safetensors, export_zero_checkpoint

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
LLAMA_WORKER = REPO / "tests" / "streamed_llama_worker.py"
# The `accelerate` of the running interpreter's environment, else the one on PATH.
ACCELERATE = Path(sys.executable).with_name("accelerate")
if not ACCELERATE.exists():
    ACCELERATE = Path(shutil.which("accelerate") or "accelerate")
# A run takes ~10 s; DeepSpeed builds its CPU communication op once per machine (~1 min).
LAUNCH_TIMEOUT_S = 300
TRAJECTORY_RTOL = 1e-5
STEPS = 6
NO_BALANCE = ["--balance_loss_weight", "0"]
HEAD_X2 = ["--head_learning_rate_scale", "2"]
LEARNING_RATE = 1e-3  # the worker's; area weights train at 1/sqrt(4 areas) of it
LLAMA_STEPS = 3
BODY_RTOL = 1e-3

# name: (config, worker arguments). `{dir:NAME}` is the folder of run NAME.
RUNS: dict[str, tuple[str, list[str]]] = {
    "single": ("cpu", NO_BALANCE),
    "ddp": ("cpu_ddp", NO_BALANCE),
    "zero2": ("cpu_zero2", NO_BALANCE),
    "zero3": (
        "cpu_zero3",
        [*NO_BALANCE, "--save_steps", "3", "--save_gathered", "{dir:zero3}/gathered.safetensors"],
    ),
    "zero3_resumed": (
        "cpu_zero3",
        [*NO_BALANCE, "--resume_from", "{dir:zero3}/trainer/checkpoint-3"],
    ),
    "single_accum": ("cpu", [*NO_BALANCE, *HEAD_X2, "--grad_accum", "2"]),
    "zero3_accum": ("cpu_zero3", [*NO_BALANCE, *HEAD_X2, "--grad_accum", "2"]),
    "ddp_forced": ("cpu_ddp", ["--force_rank_areas"]),
    "zero3_forced": ("cpu_zero3", ["--force_rank_areas"]),
    "single_balance": ("cpu", ["--logging_steps", "3"]),
    "ddp_balance": ("cpu_ddp", ["--logging_steps", "3"]),
    "zero3_streamed_llama": ("cpu_zero3", ["--max_steps", str(LLAMA_STEPS)]),
}
# Runs of another worker than WORKER.
WORKERS = {"zero3_streamed_llama": LLAMA_WORKER}


def _environment(config: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    if config == "cpu_ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # see accelerate_configs/cpu_ddp.yaml
    return env


def _launch(config: str, args: list[str], folder: Path, worker: Path = WORKER) -> dict[str, Any]:
    """Run `worker` under `config`; return its report. Kills the whole run on timeout."""
    folder.mkdir(parents=True)
    report = folder / "report.json"
    command = [
        str(ACCELERATE), "launch", "--config_file", f"accelerate_configs/{config}.yaml",
        "--main_process_port", str(free_port()), str(worker),
        "--output", str(report), "--output_dir", str(folder / "trainer"),
        *([] if "--max_steps" in args else ["--max_steps", str(STEPS)]), *args,
    ]
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=_environment(config), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            code = process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            code = None
    tail = (folder / "log.txt").read_text()[-4000:]
    if code is None:
        raise RuntimeError(f"{' '.join(command)} hung for {LAUNCH_TIMEOUT_S} s:\n{tail}")
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}:\n{tail}")
    return json.loads(report.read_text())


class Runs:
    """Launches each run of `RUNS` on first use and keeps its report."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reports: dict[str, dict[str, Any]] = {}

    def folder(self, name: str) -> Path:
        return self.root / name

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self.reports:
            config, args = RUNS[name]
            resolved = []
            for arg in args:
                for other in RUNS:
                    if "{dir:" + other + "}" in arg:
                        if other != name:
                            self[other]  # a run that this one reads from runs first
                        arg = arg.replace("{dir:" + other + "}", str(self.folder(other)))
                resolved.append(arg)
            worker = WORKERS.get(name, WORKER)
            self.reports[name] = _launch(config, resolved, self.folder(name), worker)
        return self.reports[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


def _samples_per_step(report: dict[str, Any]) -> dict[str, list[tuple]]:
    """Per step, the sorted fingerprints of every sample any rank used."""
    steps: dict[str, list[tuple]] = {}
    for rank in report["ranks"]:
        for step, samples in rank["samples"].items():
            steps.setdefault(step, []).extend(tuple(sample) for sample in samples)
    return {step: sorted(samples) for step, samples in steps.items()}


def _assert_same_trajectory(report: dict[str, Any], reference: dict[str, Any]) -> None:
    assert _samples_per_step(report) == _samples_per_step(reference), "global batches differ"
    assert list(report["steps"]) == list(reference["steps"])
    for step, losses in reference["steps"].items():
        for key in ("loss", "task_loss"):
            assert report["steps"][step][key] == pytest.approx(
                losses[key], rel=TRAJECTORY_RTOL
            ), f"{key} at step {step}"


EXPECTED_SETUP = {
    "single": ("NO", None, 1, "sal_hf.models.mlp.MLPForImageClassification"),
    "ddp": ("MULTI_CPU", None, 2, "torch.nn.parallel.distributed.DistributedDataParallel"),
    "zero2": ("DEEPSPEED", 2, 2, "deepspeed.runtime.engine.DeepSpeedEngine"),
    "zero3": ("DEEPSPEED", 3, 2, "deepspeed.runtime.engine.DeepSpeedEngine"),
}


@pytest.mark.parametrize("name", list(EXPECTED_SETUP))
def test_config_runs_the_set_up_it_names(runs: Runs, name: str) -> None:
    distributed_type, zero_stage, num_processes, wrapper = EXPECTED_SETUP[name]
    info = runs[name]["distributed"]
    assert info["distributed_type"] == distributed_type
    assert info["zero_stage"] == zero_stage
    assert info["num_processes"] == num_processes
    assert info["wrapper_class"] == wrapper
    assert [rank["rank"] for rank in runs[name]["ranks"]] == list(range(num_processes))


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_engine_takes_its_batch_settings_from_training_arguments(
    runs: Runs, name: str
) -> None:
    info = runs[name]["distributed"]
    assert info["engine_zero_stage"] == EXPECTED_SETUP[name][1]
    assert (info["engine_micro_batch"], info["engine_grad_accum"]) == (16, 1)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_two_processes_follow_the_single_process_trajectory(runs: Runs, name: str) -> None:
    _assert_same_trajectory(runs[name], runs["single"])


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_ranks_end_with_identical_parameters_and_router_state(runs: Runs, name: str) -> None:
    first, second = runs[name]["ranks"]
    assert first["checksum"] == second["checksum"] == runs[name]["final_checksum"]
    assert first["running_means"] == second["running_means"]


# Per parameter group, in the order SALTrainer builds them: for the decayed, then the
# undecayed parameters, the rest (routers), the area weights, and the head if it has its own rate.
GROUP_RATES = [LEARNING_RATE, LEARNING_RATE / 2] * 2
GROUP_RATES_HEAD_X2 = [LEARNING_RATE, LEARNING_RATE / 2, 2 * LEARNING_RATE] * 2


@pytest.mark.parametrize(
    ("name", "rates"),
    [("single", GROUP_RATES), ("ddp", GROUP_RATES), ("zero2", GROUP_RATES),
     ("zero3", GROUP_RATES), ("single_accum", GROUP_RATES_HEAD_X2),
     ("zero3_accum", GROUP_RATES_HEAD_X2)],
)
def test_the_stepping_optimizer_keeps_each_groups_scaled_learning_rate(
    runs: Runs, name: str, rates: list[float]
) -> None:
    # Under DeepSpeed the Trainer asks SALTrainer for the optimizer twice; the scales must be
    # applied once (applied twice, the area weights trained at 1/4 of the rate, not 1/2).
    assert runs[name]["group_learning_rates"] == pytest.approx(rates, rel=1e-12)


def test_gradient_accumulation_under_zero3_follows_the_single_process_trajectory(
    runs: Runs,
) -> None:
    # Two processes x 8 samples x 2 micro-steps against one process x 16 x 2: each micro-step
    # sees the same 16 samples, so the routers' running means update identically too. Both
    # train the head at 2x the learning rate.
    report = runs["zero3_accum"]
    engine = report["distributed"]
    assert (engine["engine_micro_batch"], engine["engine_grad_accum"]) == (8, 2)
    _assert_same_trajectory(report, runs["single_accum"])


@pytest.mark.parametrize("name", ["ddp_forced", "zero3_forced"])
def test_ranks_routing_to_disjoint_areas_train_every_area_without_hanging(
    runs: Runs, name: str
) -> None:
    report = runs[name]
    assert report["global_step"] == STEPS
    first, second = report["ranks"]
    for router, areas in first["areas_used"].items():
        assert areas == [0, 1] and second["areas_used"][router] == [2, 3]
    # Each area was used on one rank only, yet its update reached both ranks.
    assert all(all(moved) for moved in report["changed_areas"].values())
    assert first["checksum"] == second["checksum"]
    assert first["running_means"] == second["running_means"]


def test_zero3_resume_continues_the_run(runs: Runs) -> None:
    # Exactly: the checkpoint restores parameters, optimizer state, the routers' running means,
    # the RNG and the position in the data, so steps 4-6 are recomputed bit for bit.
    uninterrupted, resumed = runs["zero3"], runs["zero3_resumed"]
    assert resumed["global_step"] == STEPS
    later = {step: s for step, s in _samples_per_step(uninterrupted).items() if int(step) > 3}
    assert _samples_per_step(resumed) == later
    for step in later:
        assert resumed["steps"][step] == uninterrupted["steps"][step]
    assert resumed["final_checksum"] == uninterrupted["final_checksum"]


def test_zero3_export_loads_in_one_process_bit_for_bit(runs: Runs, tmp_path: Path) -> None:
    runs["zero3"]
    checkpoint = runs.folder("zero3") / "trainer" / f"checkpoint-{STEPS}"
    exported = export_zero_checkpoint(checkpoint, tmp_path / "exported")

    with safe_open(exported / "model.safetensors", framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    gathered = load_file(runs.folder("zero3") / "gathered.safetensors")
    loaded = AutoSALModelForImageClassification.from_pretrained(exported).state_dict()
    assert sorted(loaded) == sorted(gathered)
    unequal = [name for name in gathered if not torch.equal(loaded[name], gathered[name])]
    assert unequal == []


def test_export_refuses_a_folder_without_zero_shards(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no `latest` file"):
        export_zero_checkpoint(tmp_path, tmp_path / "exported")


def test_export_refuses_to_write_into_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="stays resumable"):
        export_zero_checkpoint(tmp_path, tmp_path)


def test_export_stores_tied_weights_once_and_views_as_their_own_tensors() -> None:
    flat, tied = torch.arange(10.0), torch.ones(2, 3)
    state = {"a": flat[:4].view(2, 2), "b": flat[4:].view(2, 3), "embed": tied, "head": tied}
    stored = _for_safetensors(state)
    assert list(stored) == ["a", "b", "embed"]
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in stored.values())
    assert torch.equal(stored["b"], flat[4:].view(2, 3))


def test_ddp_with_the_balance_term_follows_the_single_process_trajectory(runs: Runs) -> None:
    _assert_same_trajectory(runs["ddp_balance"], runs["single_balance"])


def test_logged_task_loss_is_the_mean_over_ranks(runs: Runs) -> None:
    report = runs["ddp"]
    logged = {str(e["step"]): e["task_loss"] for e in report["log_history"] if "task_loss" in e}
    for step, losses in report["steps"].items():
        assert logged[step] == pytest.approx(losses["task_loss"], abs=2e-6)


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(n / total * math.log(n / total) for n in counts if n)


def test_logged_area_usage_counts_every_rank_under_ddp(runs: Runs) -> None:
    report = runs["ddp_balance"]
    logged = [entry for entry in report["log_history"] if "area_entropy/layers.0" in entry]
    previous = 0
    for entry in logged:
        for index in (0, 1):
            steps = range(previous + 1, entry["step"] + 1)
            counts = [0] * 4
            for rank in report["ranks"]:
                usage = rank["usage"][f"sal_controller.routers.{index}"]
                for step in steps:
                    counts = [a + b for a, b in zip(counts, usage[str(step)], strict=True)]
            expected = round(_entropy(counts), 4)
            assert entry[f"area_entropy/layers.{index}"] == pytest.approx(expected, abs=1e-4)
        previous = entry["step"]


@pytest.fixture(scope="module")
def single_streamed_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one-process reference of the `zero3_streamed_llama` run, trained in this process:
    launched, it would spend most of its time starting Python. One thread, as the launched
    ranks have (OMP_NUM_THREADS=1)."""
    folder = tmp_path_factory.mktemp("single_streamed_llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = streamed_llama_worker.train(
            folder, LLAMA_STEPS, extra_arguments=("--use_cpu", "true")
        )
    finally:
        torch.set_num_threads(threads)
    return {**json.loads(json.dumps(report)), "folder": str(folder)}


def _initial_and_final(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(folder / "initial.safetensors"), load_file(folder / "final.safetensors")


def test_streamed_llama_under_zero3_follows_the_single_process_trajectory(
    runs: Runs, single_streamed_llama: dict[str, Any]
) -> None:
    report = runs["zero3_streamed_llama"]
    assert (report["distributed"]["zero_stage"], report["distributed"]["num_processes"]) == (3, 2)
    assert report["streamed"] and single_streamed_llama["streamed"]
    _assert_same_trajectory(report, single_streamed_llama)


def test_streamed_llama_under_zero3_updates_its_decoder_layers_as_one_process_does(
    runs: Runs, single_streamed_llama: dict[str, Any]
) -> None:
    runs["zero3_streamed_llama"]
    initial, final = _initial_and_final(runs.folder("zero3_streamed_llama") / "trainer")
    reference_initial, reference = _initial_and_final(Path(single_streamed_llama["folder"]))
    assert all(torch.equal(initial[name], reference_initial[name]) for name in initial)
    # Per decoder layer: 4 attention projections, 3 area layers of the MLP, 2 RMS norms.
    body = [name for name in initial if name.startswith("model.layers.")]
    assert len(body) == 2 * 9
    for name in body:
        moved, expected = final[name] - initial[name], reference[name] - initial[name]
        assert moved.norm() > 0, f"{name} did not move"
        assert (moved - expected).norm() <= BODY_RTOL * expected.norm(), name
