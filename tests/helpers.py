"""Small models shared by the tests."""

from __future__ import annotations

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
