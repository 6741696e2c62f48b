"""A plain MLP classifier as a `transformers` model, and its SAL handler.

`MLPClassifierConfig` / `MLPForImageClassification` are an ordinary dense network (the paper's
architecture: ReLU, Kaiming init), saved and loaded like any `transformers` model. Its SAL
variant comes from `convert_to_sal`: every hidden layer is one region whose dense layer becomes
an area layer; the classifier is the head.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput

from ..config import SALConfig
from ..conversion import register_handler, upcycle_linear
from ..regions import RegionSpec, SALLayout

__all__ = ["MLPClassifierConfig", "MLPForImageClassification", "MLPLayer", "MLPHandler"]


@strict
class MLPClassifierConfig(PreTrainedConfig):
    """Config of `MLPForImageClassification`.

    Args:
        input_size: number of input features (784 for flattened 28x28 images).
        hidden_size: width of every hidden layer.
        num_layers: number of hidden layers; the classifier comes on top of them.
        hidden_act: activation of the hidden layers.
        residual: make every hidden layer after the first a pre-norm residual block,
            `h + act(dense(layer_norm(h)))`, with a final layer norm before the classifier (norms
            without learned parameters). The first layer stays `act(dense(x))`. Plain layers
            (the paper's network) are the default; deep networks (tens of layers and more) need
            the residual form to train with feedback methods (docs/method.md).
        num_labels: number of classes (a standard `PreTrainedConfig` argument).
    """

    model_type = "mlp_classifier"

    input_size: int = 784
    hidden_size: int = 256
    num_layers: int = 2
    hidden_act: str = "relu"
    residual: bool = False

    def validate_architecture(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"MLPClassifierConfig.{name} must be >= 1, got {value}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"MLPClassifierConfig.hidden_act={self.hidden_act!r} is unknown; use one of "
                f"{sorted(ACT2FN)}."
            )


class MLPLayer(GradientCheckpointingLayer):
    """One hidden layer, `[batch, in] -> [batch, hidden]`: `act(dense(hidden_states))`, or with
    `residual=True`, `hidden_states + act(dense(layer_norm(hidden_states)))`."""

    def __init__(self, in_features: int, config: MLPClassifierConfig, residual: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False) if residual else None
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        if self.norm is None:
            return self.act(self.dense(hidden_states))
        return hidden_states + self.act(self.dense(self.norm(hidden_states)))


class MLPPreTrainedModel(PreTrainedModel):
    config_class = MLPClassifierConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLPLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # Kaiming-normal (fan-in, ReLU) weights and zero biases, as in the paper's MLP.
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class MLPForImageClassification(MLPPreTrainedModel):
    """`pixel_values` `[batch, input_size]` (or any shape that flattens to it) -> class logits."""

    def __init__(self, config: MLPClassifierConfig) -> None:
        super().__init__(config)
        widths = [config.input_size] + [config.hidden_size] * config.num_layers
        self.layers = nn.ModuleList(
            MLPLayer(width, config, residual=config.residual and index > 0)
            for index, width in enumerate(widths[:-1])
        )
        self.norm = (
            nn.LayerNorm(config.hidden_size, elementwise_affine=False) if config.residual else None
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> None:
        """None: the MLP has no embedding table; its first hidden layer reads the pixels.

        `PreTrainedModel`'s default raises NotImplementedError instead, which stops callers
        that ask every model for its embeddings, such as Accelerate's FSDP2 set-up.
        """
        return None

    def forward(self, pixel_values, labels=None) -> ImageClassifierOutput:
        hidden_states = pixel_values.flatten(1).to(self.classifier.weight.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        logits = self.classifier(hidden_states)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


class MLPHandler:
    """Each hidden layer is a region; its `dense` becomes an area layer."""

    name = "mlp_classifier"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, MLPForImageClassification)

    def build_layout(self, model: MLPForImageClassification, sal_config: SALConfig) -> SALLayout:
        regions = []
        for index, layer in enumerate(model.layers):
            layer.dense = upcycle_linear(layer.dense, sal_config)
            regions.append(
                RegionSpec(f"layers.{index}", layer, layer.dense.out_features, [layer.dense])
            )
        # With a final norm, the head is norm + classifier: its input is the last region output.
        head_input = model.norm if model.norm is not None else model.classifier
        return SALLayout(regions, head_input, model.classifier, model.config.num_labels)


AutoConfig.register(MLPClassifierConfig.model_type, MLPClassifierConfig)
AutoModelForImageClassification.register(MLPClassifierConfig, MLPForImageClassification)
register_handler(MLPHandler())
