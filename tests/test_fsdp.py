"""SAL under PyTorch FSDP2 (`fully_shard`) on two CPU processes.

Accelerate 1.16 runs FSDP only on GPU-type processes (accelerate_configs/fsdp.yaml), so the
model is sharded with torch directly: `tests/fsdp_worker.py`, started once for the module by
`python -m torch.distributed.run` with 2 processes over gloo, shards every region and then the
root, and trains with a plain loop (one `backward()` per step) a SAL MLP on real MNIST rows, the
same MLP with the ranks forced onto disjoint areas, and a tiny SAL GPT-2 with per-token routing.
The launch is killed after `LAUNCH_TIMEOUT_S`, so a hang fails the tests instead of blocking the
suite. The one-process references are trained here, from the worker's own set-ups.

Tolerance of the trajectory tests: `TRAJECTORY_RTOL = 1e-5`, that of tests/test_distributed.py,
for the same reason: with the same global batch, two processes differ from one only in the order
of fp32 sums (each rank sums its half of the batch before the gradients' reduce-scatter; the
routers add two halves). The routers' balance term is on, so the whole SAL update is compared.
Measured: at most 1.3e-7 relative on the MLP's losses over 6 AdamW steps, 9.1e-8 on GPT-2's over
4, a margin of 75x. A real fault is far larger: a rank stepping on its own half of the batch
alone moves the loss by 6.5e-3 (MLP) and 1.1e-2 (GPT-2) after one step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsdp_worker
import pytest
from helpers import free_port, kill_tree, tiny_mlp
from safetensors.torch import load_file

from sal_hf import AutoSALModelForImageClassification, get_controller

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"
# The launch takes ~20 s on 2 busy cores; a collective that hangs raises after the worker's
# COLLECTIVE_TIMEOUT_S, and this kills whatever is left.
LAUNCH_TIMEOUT_S = 240
TRAJECTORY_RTOL = 1e-5
WORLD = 2

distributed = pytest.mark.distributed


class Launch:
    """One torchrun launch of every worker case; `report(case)` reads a case's report."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(WORKER), "--output_dir", str(folder),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(folder / "log.txt", "w") as log:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                self.code: int | None = process.wait(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                kill_tree(process.pid)
                process.wait()
                self.code = None

    def report(self, case: str) -> dict[str, Any]:
        path = self.folder / f"{case}.json"
        if not path.exists():
            ended = f"hung for {LAUNCH_TIMEOUT_S} s" if self.code is None else f"exited {self.code}"
            tail = (self.folder / "log.txt").read_text()[-4000:]
            pytest.fail(f"the FSDP launch {ended} before case {case} finished:\n{tail}")
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return Launch(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def single_process() -> dict[str, list[dict[str, float]]]:
    return {case: fsdp_worker.single_process(case) for case in fsdp_worker.SETUPS}


def _regions_with_parameters(case: str) -> list[str]:
    model = fsdp_worker.SETUPS[case].model()
    names = {module: name for name, module in model.named_modules()}
    return [
        names[region.module] for region in get_controller(model).regions
        if next(region.module.parameters(), None) is not None
    ]


@distributed
@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_every_region_with_parameters_and_the_root_are_fsdp_units(
    launch: Launch, case: str
) -> None:
    # MLP: its two hidden layers. GPT-2: its two blocks (and whatever else its handler makes a
    # region with parameters); its embedding region, a dropout, has none.
    regions = _regions_with_parameters(case)
    if case == "mlp":
        assert regions == ["layers.0", "layers.1"]
    else:
        assert regions[:2] == ["transformer.h.0", "transformer.h.1"]
    for rank in launch.report(case)["ranks"]:
        assert rank["units"] == ["", *regions]


@distributed
def test_every_parameter_is_a_dtensor_sharded_in_halves_over_both_ranks(launch: Launch) -> None:
    ranks = launch.report("mlp")["ranks"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    for rank in ranks:
        parameters = rank["parameters"]
        assert len(parameters) == 10  # 2 area layers, the classifier, 2 routers: weight, bias
        for name, held in parameters.items():
            assert held["dtensor"] and held["mesh_size"] == WORLD, name
            assert held["placements"] == ["Shard(dim=0)"], name
            assert held["local_shape"] == [held["shape"][0] // WORLD, *held["shape"][1:]], name
        # The stacked area weights are split by area: each rank holds 2 of the 4.
        assert parameters["layers.0.dense.weight"]["shape"] == [4, 64, 784]
        assert parameters["layers.0.dense.weight"]["local_shape"] == [2, 64, 784]


@distributed
@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_two_sharded_processes_follow_the_single_process_trajectory(
    launch: Launch, single_process: dict[str, list[dict[str, float]]], case: str
) -> None:
    # `gpt2` routes every token on its own.
    sharded, reference = launch.report(case)["steps"], single_process[case]
    assert len(sharded) == len(reference)
    for step, (got, expected) in enumerate(zip(sharded, reference, strict=True), start=1):
        for key in ("loss", "task_loss"):
            assert got[key] == pytest.approx(expected[key], rel=TRAJECTORY_RTOL), (key, step)


@distributed
def test_routers_running_means_stay_identical_on_both_ranks(launch: Launch) -> None:
    # FSDP shards parameters only: each rank keeps its own copy of the routers' buffers, which
    # stay equal because every router averages its batch mean over the ranks.
    first, second = launch.report("mlp")["ranks"]
    assert first["running_means"] == second["running_means"]
    assert len(first["running_means"]) == 2


@distributed
def test_ranks_routing_to_disjoint_areas_train_every_area_without_hanging(
    launch: Launch,
) -> None:
    report = launch.report("mlp_forced")
    assert len(report["steps"]) == fsdp_worker.STEPS
    first, second = report["ranks"]
    for router, areas in first["areas_used"].items():
        assert areas == [2, 3] and second["areas_used"][router] == [0, 1]
    # Each area had rows on one rank only, the rank that does not hold it (rank 0 holds areas 0
    # and 1), and the optimizer has no weight decay: an area moved only if its gradient arrived.
    assert report["changed_areas"] == {
        "layers.0.dense": [True] * 4, "layers.1.dense": [True] * 4,
    }


@distributed
def test_gathered_state_saved_with_save_pretrained_loads_bit_for_bit(launch: Launch) -> None:
    launch.report("mlp")
    gathered = load_file(launch.folder / "mlp_gathered.safetensors")
    loaded = AutoSALModelForImageClassification.from_pretrained(launch.folder / "mlp_saved")
    state = loaded.state_dict()
    assert sorted(state) == sorted(gathered)
    assert [name for name in gathered if not state[name].equal(gathered[name])] == []


@distributed
def test_saved_config_names_the_model_class_without_fsdps_prefix(launch: Launch) -> None:
    # fully_shard swaps the model's class for `FSDPMLPForImageClassification`.
    launch.report("mlp")
    config = json.loads((launch.folder / "mlp_saved" / "config.json").read_text())
    assert config["architectures"] == ["MLPForImageClassification"]


@distributed
def test_every_process_of_the_launch_exits_cleanly(launch: Launch) -> None:
    tail = (launch.folder / "log.txt").read_text()[-4000:]
    assert launch.code == 0, tail


def test_mlp_classifier_has_no_input_embeddings() -> None:
    # Accelerate's FSDP2 set-up asks every model for its input embeddings to shard them apart;
    # PreTrainedModel's default raises NotImplementedError for a model that has none.
    assert tiny_mlp(num_areas=2).get_input_embeddings() is None
