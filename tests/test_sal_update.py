"""The SAL update of a tiny network, against a hand-computed NumPy reference."""

import numpy as np
import torch
import torch.nn.functional as F
from helpers import tiny_mlp

from sal_hf import get_controller
from sal_hf.routing import Router


def numpy_routing(router, inputs: np.ndarray) -> np.ndarray:
    """Areas of a router on its first training batch (the running mean is that batch's mean)."""
    weight = router.projection.weight.detach().double().numpy()
    bias = router.projection.bias.detach().double().numpy()
    projected = inputs @ weight.T + bias
    centred = projected - projected.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    return np.argmax(centred @ router.prototypes.double().numpy().T, axis=1)


def numpy_sal_gradients(model, inputs: np.ndarray, labels: np.ndarray) -> dict:
    controller = get_controller(model)
    params = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    hidden, pre_activations, region_inputs, areas = inputs, [], [], []
    for index in range(len(model.layers)):
        area = numpy_routing(controller.routers[str(index)], hidden)
        weight, bias = params[f"layers.{index}.dense.weight"], params[f"layers.{index}.dense.bias"]
        pre = np.einsum("noi,ni->no", weight[area], hidden) + bias[area]
        region_inputs.append(hidden)
        pre_activations.append(pre)
        areas.append(area)
        hidden = np.maximum(pre, 0.0)
    logits = hidden @ params["classifier.weight"].T + params["classifier.bias"]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    error = (probs - np.eye(logits.shape[1])[labels]) / len(labels)  # dL/dlogits, mean CE
    grads = {"classifier.weight": error.T @ hidden, "classifier.bias": error.sum(0)}
    for index, (pre, x, area) in enumerate(zip(pre_activations, region_inputs, areas, strict=True)):
        feedback = controller.feedback.matrices(index)[0].double().numpy()
        delta = (error @ feedback) * (pre > 0)  # e @ B_l, through the region's own ReLU only
        weight_grad = np.zeros_like(params[f"layers.{index}.dense.weight"])
        bias_grad = np.zeros_like(params[f"layers.{index}.dense.bias"])
        np.add.at(weight_grad, area, np.einsum("no,ni->noi", delta, x))
        np.add.at(bias_grad, area, delta)
        grads[f"layers.{index}.dense.weight"] = weight_grad
        grads[f"layers.{index}.dense.bias"] = bias_grad
    return grads


def test_gradients_equal_the_numpy_reference():
    model = tiny_mlp(num_areas=2).train()
    inputs = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model(pixel_values=inputs, labels=labels).loss.backward()
    expected = numpy_sal_gradients(model, inputs.double().numpy(), labels.numpy())
    for name, reference in expected.items():
        actual = dict(model.named_parameters())[name].grad.double().numpy()
        np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-7, err_msg=name)


def test_routing_equals_the_numpy_reference():
    model = tiny_mlp(num_areas=3).train()
    inputs = torch.randn(32, 5)
    model(pixel_values=inputs)
    router = get_controller(model).routers["0"]
    expected = numpy_routing(router, inputs.double().numpy())
    assert router.last_areas.tolist() == expected.tolist()


def test_region_output_receives_exactly_e_times_its_feedback_matrix():
    model = tiny_mlp(num_areas=2).train()
    controller = get_controller(model)
    received = {}

    def capture(index):
        def hook(module, args, output):
            output.register_hook(lambda grad: received.setdefault(index, grad.clone()))

        return hook

    for index, layer in enumerate(model.layers):  # the tensor the region computes last
        layer.act.register_forward_hook(capture(index))
    inputs, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    output = model(pixel_values=inputs, labels=labels)
    error = (F.softmax(output.logits.detach(), -1) - F.one_hot(labels, 3)) / 6
    output.loss.backward()
    for index in range(2):
        expected = error @ controller.feedback.matrices(index)[0]
        torch.testing.assert_close(received[index], expected, rtol=0, atol=1e-7)


def test_no_gradient_reaches_a_region_input():
    model = tiny_mlp(num_areas=2).train()
    seen_inputs = []
    for layer in model.layers[1:]:
        layer.register_forward_pre_hook(lambda module, args: seen_inputs.append(args[0]))
    model.classifier.register_forward_pre_hook(lambda module, args: seen_inputs.append(args[0]))
    inputs = torch.randn(6, 5, requires_grad=True)
    model(pixel_values=inputs, labels=torch.zeros(6, dtype=torch.long)).loss.backward()
    assert all(not tensor.requires_grad and tensor.grad_fn is None for tensor in seen_inputs)
    assert inputs.grad is None  # the first region's input is detached as well


def test_a_sample_updates_only_its_own_area():
    model = tiny_mlp(num_areas=4).train()
    inputs = torch.randn(1, 5)
    model(pixel_values=inputs, labels=torch.tensor([1])).loss.backward()
    for index, layer in enumerate(model.layers):
        area = get_controller(model).routers[str(index)].last_areas.item()
        grad = layer.dense.weight.grad
        assert grad[area].abs().sum() > 0
        others = torch.cat([grad[:area], grad[area + 1:]])
        assert torch.count_nonzero(others) == 0


def test_one_adam_step_leaves_other_areas_bit_for_bit_unchanged():
    model = tiny_mlp(num_areas=4).train()
    before = model.layers[0].dense.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model(pixel_values=torch.randn(1, 5), labels=torch.tensor([2])).loss.backward()
    optimizer.step()
    area = get_controller(model).routers["0"].last_areas.item()
    after = model.layers[0].dense.weight.detach()
    changed = [k for k in range(4) if not torch.equal(before[k], after[k])]
    assert changed == [area]


def test_bp_method_backpropagates_through_every_layer():
    model = tiny_mlp(method="bp").train()
    inputs = torch.randn(6, 5, requires_grad=True)
    model(pixel_values=inputs, labels=torch.zeros(6, dtype=torch.long)).loss.backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0


def numpy_router_loss(similarity: np.ndarray, temperature: float, balance: float,
                      prototype: float) -> float:
    """Prototype term (1 - chosen cosine) plus the KL of the mean soft assignment from uniform;
    an area with a share of exactly 0 contributes 0 (the limit of p log p)."""
    chosen = similarity.max(axis=1)
    scaled = similarity / temperature
    soft = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    share = soft.mean(axis=0)
    kept = share > 0
    kl = float(np.sum(share[kept] * np.log(share[kept] * len(share))))
    return prototype * float(np.mean(1.0 - chosen)) + balance * kl


def test_router_loss_equals_the_numpy_reference():
    router = Router(5, 4, routing_dim=4, temperature=0.1, balance_loss_weight=1.0,
                    prototype_loss_weight=0.1)
    similarity = torch.rand(16, 4, dtype=torch.float64) * 2 - 1

    loss = router._local_loss(similarity, similarity.argmax(dim=-1))

    expected = numpy_router_loss(similarity.numpy(), 0.1, 1.0, 0.1)
    assert abs(loss.item() - expected) < 1e-12


def test_router_loss_stays_finite_when_an_area_gets_no_share_at_all():
    # At temperature 0.01, exp(-200) underflows: area 1 gets a share of exactly 0. Its term
    # must be 0, not 0 * log 0 = NaN, whose NaN gradient would reach every parameter through
    # the global gradient norm.
    router = Router(5, 4, routing_dim=4, temperature=0.01)
    similarity = torch.tensor([[1.0, -1.0, 0.0, 0.0]] * 8, requires_grad=True)

    loss = router._local_loss(similarity, similarity.argmax(dim=-1))
    loss.backward()

    expected = numpy_router_loss(similarity.detach().double().numpy(), 0.01, 1.0, 0.1)
    assert abs(loss.item() - expected) < 1e-5
    assert torch.isfinite(similarity.grad).all()
