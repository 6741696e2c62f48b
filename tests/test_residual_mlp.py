"""The residual form of the MLP classifier (`MLPClassifierConfig(residual=True)`), the one the
depth sweep trains: its forward pass and its SAL update against NumPy references."""

import numpy as np
import torch
from helpers import tiny_mlp

from sal_hf import (
    AutoSALModelForImageClassification,
    MLPClassifierConfig,
    MLPForImageClassification,
    SALConfig,
    convert_to_sal,
    get_controller,
)

EPS = 1e-5  # nn.LayerNorm's default


def layer_norm(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + EPS)


def numpy_forward(params: dict, inputs: np.ndarray, num_layers: int, areas=None):
    """Logits, and per layer (region input, normed input, pre-activation)."""
    hidden, trace = inputs, []
    for index in range(num_layers):
        weight, bias = params[f"layers.{index}.dense.weight"], params[f"layers.{index}.dense.bias"]
        if areas is not None:  # stacked area weights: each row uses its area's
            weight, bias = weight[areas[index]], bias[areas[index]]
        else:
            weight = np.broadcast_to(weight, (len(inputs),) + weight.shape)
            bias = np.broadcast_to(bias, (len(inputs),) + bias.shape)
        normed = hidden if index == 0 else layer_norm(hidden)
        pre = np.einsum("noi,ni->no", weight, normed) + bias
        trace.append((hidden, normed, pre))
        hidden = np.maximum(pre, 0.0) if index == 0 else hidden + np.maximum(pre, 0.0)
    head_input = layer_norm(hidden)
    logits = head_input @ params["classifier.weight"].T + params["classifier.bias"]
    return logits, trace, head_input


def test_first_layer_is_plain_and_the_others_pre_norm_residual():
    model = MLPForImageClassification(MLPClassifierConfig(
        input_size=5, hidden_size=4, num_layers=3, num_labels=3, residual=True))
    assert model.layers[0].norm is None
    assert all(layer.norm is not None for layer in model.layers[1:])
    assert model.norm is not None
    assert not any(name.startswith(("norm", "layers.1.norm")) for name, _ in
                   model.named_parameters())  # the norms have no learned parameters


def test_residual_forward_equals_the_numpy_reference():
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPClassifierConfig(
        input_size=5, hidden_size=4, num_layers=3, num_labels=3, residual=True)).double()
    inputs = torch.randn(7, 5, dtype=torch.float64)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    expected, _, _ = numpy_forward(params, inputs.numpy(), 3)
    np.testing.assert_allclose(model(pixel_values=inputs).logits.detach().numpy(), expected,
                               rtol=0, atol=1e-12)


def test_converted_residual_model_computes_what_the_dense_one_did():
    torch.manual_seed(0)
    config = MLPClassifierConfig(input_size=5, hidden_size=4, num_layers=3, num_labels=3,
                                 residual=True)
    dense = MLPForImageClassification(config).double()
    inputs = torch.randn(9, 5, dtype=torch.float64)
    expected = dense(pixel_values=inputs).logits
    sal = convert_to_sal(dense, SALConfig(num_areas=4, routing_dim=4, shared_path=True)).eval()
    # Rows are multiplied in area groups, so only the summation order may differ.
    torch.testing.assert_close(sal(pixel_values=inputs).logits, expected, rtol=0, atol=1e-12)


def test_residual_sal_gradients_equal_the_numpy_reference():
    torch.manual_seed(1)
    model = tiny_mlp(num_layers=3, residual=True, num_areas=2).double().train()
    controller = get_controller(model)
    inputs, labels = torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model(pixel_values=inputs, labels=labels).loss.backward()  # task loss only
    areas = [controller.routers[str(i)].last_areas.numpy() for i in range(3)]
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    logits, trace, head_input = numpy_forward(params, inputs.numpy(), 3, areas)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    error = (probs - np.eye(3)[labels.numpy()]) / len(labels)
    expected = {"classifier.weight": error.T @ head_input, "classifier.bias": error.sum(0)}
    for index, (_, normed, pre) in enumerate(trace):
        feedback = controller.feedback.matrices(index)[0].double().numpy()
        # The feedback reaches the block's output; the identity path carries no parameter, and
        # nothing flows on into the block's (detached) input.
        delta = (error @ feedback) * (pre > 0)
        weight_grad = np.zeros_like(params[f"layers.{index}.dense.weight"])
        bias_grad = np.zeros_like(params[f"layers.{index}.dense.bias"])
        np.add.at(weight_grad, areas[index], np.einsum("no,ni->noi", delta, normed))
        np.add.at(bias_grad, areas[index], delta)
        expected[f"layers.{index}.dense.weight"] = weight_grad
        expected[f"layers.{index}.dense.bias"] = bias_grad
    for name, value in expected.items():
        grad = dict(model.named_parameters())[name].grad.numpy()
        # The loss is taken in float32 (the model casts logits), hence float32 tolerance.
        np.testing.assert_allclose(grad, value, rtol=0, atol=1e-7, err_msg=name)


def test_no_gradient_crosses_a_residual_block_boundary():
    model = tiny_mlp(num_layers=4, residual=True, num_areas=2).train()
    seen = []
    for layer in model.layers[1:]:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    inputs = torch.randn(6, 5, requires_grad=True)
    model(pixel_values=inputs, labels=torch.zeros(6, dtype=torch.long)).loss.backward()
    assert len(seen) == 4
    assert all(tensor.grad_fn is None and not tensor.requires_grad for tensor in seen)
    assert inputs.grad is None


def test_residual_checkpoint_round_trips_bit_for_bit(tmp_path):
    model = tiny_mlp(num_layers=3, residual=True, num_areas=2)
    model.save_pretrained(tmp_path)
    loaded = AutoSALModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.residual is True
    inputs = torch.randn(4, 5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    torch.testing.assert_close(loaded(pixel_values=inputs).logits,
                               model.eval()(pixel_values=inputs).logits, rtol=0, atol=0)
