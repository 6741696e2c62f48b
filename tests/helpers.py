"""Small models shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
