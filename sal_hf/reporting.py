"""What a training run reports: peak memory, the distributed set-up, results files and plots."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .routing import max_entropy, usage_entropy

__all__ = [
    "PeakMemory",
    "StepTimer",
    "distributed_info",
    "plot_learning_curves",
    "quiet_deprecated_collectives",
    "run_label",
    "usage_entropy_ratio",
    "usage_summary",
    "write_results",
]


# DeepSpeed's ZeRO stages call collectives that torch 2.13 deprecated; each call warns, which
# on a 20-step 1B run was 3,500 warnings around 70 lines of log. Nothing a user can change.
_DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
)


def quiet_deprecated_collectives() -> None:
    """Hide torch's deprecation warnings for the collectives DeepSpeed calls (recipes call it)."""
    warnings.filterwarnings("ignore", message=_DEPRECATED_COLLECTIVES, category=FutureWarning)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the code run inside `with PeakMemory() as memory:`.

    On CUDA: `torch.cuda.max_memory_allocated` (tensors only). On CPU: the process's resident
    set size, sampled every `interval_s` in a background thread; `peak_mb` is the highest RSS
    seen, `peak_increase_mb` its rise over the RSS at entry (what the enclosed work added).
    `process_peak_mb` is the kernel's peak RSS of the whole process since it started.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.peak_increase_mb = 0.0
        self.process_peak_mb = 0.0
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _rss_bytes()
            self._peak = self._start
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc_info) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = peak / 2**20
        self.peak_increase_mb = (peak - self._start) / 2**20
        self.process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def as_dict(self) -> dict[str, float]:
        return {
            "peak_memory_mb": round(self.peak_mb, 1),
            "peak_memory_increase_mb": round(self.peak_increase_mb, 1),
            "process_peak_memory_mb": round(self.process_peak_mb, 1),
            "memory_device": self.device,
        }


def distributed_info(trainer) -> dict[str, Any]:
    """How the run was distributed, as Accelerate names it (`DEEPSPEED`, `MULTI_CPU`, ...).

    Also records whether a DeepSpeed engine really wraps the model, since `accelerate launch
    --cpu` silently drops a DeepSpeed config.
    """
    accelerator = trainer.accelerator
    state = accelerator.state
    zero_stage = None
    if state.deepspeed_plugin is not None:
        zero_stage = state.deepspeed_plugin.zero_stage
    wrapped = type(trainer.model_wrapped).__name__ if trainer.model_wrapped is not None else None
    return {
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "zero_stage": zero_stage,
        "num_processes": accelerator.num_processes,
        "model_wrapper": wrapped,
    }


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write `results` as indented JSON (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def plot_learning_curves(
    histories: dict[str, list[dict[str, Any]]],
    path: str | os.PathLike,
    *,
    loss_key: str = "task_loss",
    metric_key: str = "eval_accuracy",
    title: str = "",
) -> Path:
    """Plot training loss and an evaluation metric per run, from Trainer `log_history`s.

    `histories` maps a label ("SAL-16", "BP") to a `trainer.state.log_history`. Runs without
    `loss_key` entries (BP has no router) fall back to `loss`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        key = loss_key if any(loss_key in entry for entry in history) else "loss"
        steps = [(entry["epoch"], entry[key]) for entry in history if key in entry]
        metric = [(entry["epoch"], entry[metric_key]) for entry in history if metric_key in entry]
        if steps:
            loss_axis.plot(*zip(*steps, strict=True), label=label)
        if metric:
            metric_axis.plot(*zip(*metric, strict=True), marker="o", label=label)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    metric_axis.set(xlabel="epoch", ylabel=metric_key, title=metric_key)
    empty = {loss_axis: "no training loss logged:\nfewer steps than --logging_steps?",
             metric_axis: f"no {metric_key} logged:\nno evaluation during training?"}
    for axis, message in empty.items():
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
        else:  # e.g. a run shorter than its logging_steps
            axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_label(results: dict) -> str:
    method = results["method"]
    if method == "sal":
        sal_config = results.get("sal_config") or {}
        shared = results.get("shared_path", sal_config.get("shared_path"))
        areas = results.get("num_areas", sal_config.get("num_areas", "?"))
        return f"SAL-{areas}" + (" + shared path" if shared else "")
    if method == "bp" and results.get("bp_recipe") == "paper":
        return "BP (paper recipe)"
    return str(method).upper()


def usage_entropy_ratio(fractions: list[float]) -> float:
    """The entropy of a layer's area usage over log(number of areas): 1 is uniform usage."""
    return usage_entropy(torch.tensor(fractions)) / max_entropy(len(fractions))


def usage_summary(results: dict) -> str:
    """Per SAL layer: normalised usage entropy and the largest area share on the test set.

    A layer's usage is its list of fractions, or a mapping holding them under "fractions" (as
    the 1B recipe writes it)."""
    parts = []
    for layer, usage in (results.get("area_usage") or {}).items():
        fractions = usage.get("fractions") if isinstance(usage, dict) else usage
        if not fractions or len(fractions) < 2:
            continue
        parts.append(f"{layer}: H/logK={usage_entropy_ratio(fractions):.3f} "
                     f"max={max(fractions):.3f}")
    return "; ".join(parts) if parts else "one area"


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, update), evaluation excluded."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._started)
