"""sal-hf: Selective Adaptive Learning (SAL) for Hugging Face models, without backpropagation."""

from .areas import AreaLinear
from .checkpoint import (
    AutoSALModelForCausalLM,
    AutoSALModelForImageClassification,
    AutoSALModelForSequenceClassification,
    SALCheckpointError,
    parameter_counts,
    prepare_for_hub,
    write_model_card,
)
from .config import SALConfig
from .conversion import convert_to_sal, register_handler, supported_architectures
from .feedback import DirectFeedback, ErrorSignal, FeedbackInjector, FeedbackTap
from .models import MLPClassifierConfig, MLPForImageClassification
from .regions import RegionSpec, SALController, SALLayout, get_controller
from .routing import Router

__version__ = "0.1.0"

__all__ = [
    "AreaLinear",
    "AutoSALModelForCausalLM",
    "AutoSALModelForImageClassification",
    "AutoSALModelForSequenceClassification",
    "DirectFeedback",
    "ErrorSignal",
    "FeedbackInjector",
    "FeedbackTap",
    "MLPClassifierConfig",
    "MLPForImageClassification",
    "RegionSpec",
    "Router",
    "SALCheckpointError",
    "SALConfig",
    "SALController",
    "SALLayout",
    "convert_to_sal",
    "get_controller",
    "parameter_counts",
    "prepare_for_hub",
    "register_handler",
    "supported_architectures",
    "write_model_card",
]
