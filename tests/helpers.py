"""Small models shared by the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
from pathlib import Path

import psutil

from sal_hf import MLPClassifierConfig, MLPForImageClassification, SALConfig, convert_to_sal


def tiny_mlp(
    *, input_size: int = 5, hidden_size: int = 4, num_layers: int = 2, num_labels: int = 3,
    residual: bool = False, **sal_options,
) -> MLPForImageClassification:
    """A converted MLP small enough to check by hand."""
    config = MLPClassifierConfig(
        input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
        num_labels=num_labels, residual=residual,
    )
    sal_options.setdefault("routing_dim", 4)
    return convert_to_sal(MLPForImageClassification(config), SALConfig(**sal_options))


ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str):
    """`recipes/<name>.py` as a module (the recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a local rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_tree(pid: int) -> None:
    """Kill a launch and every process under it (torchrun starts workers in new sessions)."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
