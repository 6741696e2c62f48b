"""Model families. Importing a family registers its SAL handler with `convert_to_sal`."""

from . import bert, gpt2, llama, mlp, vit
from .bert import BertHandler
from .gpt2 import GPT2Handler
from .llama import LlamaHandler
from .mlp import MLPClassifierConfig, MLPForImageClassification
from .vit import ViTHandler

__all__ = [
    "bert",
    "gpt2",
    "llama",
    "mlp",
    "vit",
    "BertHandler",
    "GPT2Handler",
    "LlamaHandler",
    "MLPClassifierConfig",
    "MLPForImageClassification",
    "ViTHandler",
]
