"""Model families. Importing a family registers its SAL handler with `convert_to_sal`."""

from . import mlp
from .mlp import MLPClassifierConfig, MLPForImageClassification

__all__ = ["mlp", "MLPClassifierConfig", "MLPForImageClassification"]
