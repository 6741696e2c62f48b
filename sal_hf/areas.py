"""Area layers: a linear layer whose parameters are split into mutually exclusive areas.

The weights of all areas are stacked in one parameter, `[num_areas, out_features, in_features]`.
Rows routed to area `k` are multiplied by area `k`'s weights only, so only the routed areas
compute and only their slices of the parameter receive a gradient. Keeping every area in one
parameter also means every forward pass touches the same parameters whatever the routing, which
is what ZeRO-3's parameter gathering and DDP's gradient reduction need.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AreaLinear", "AreaSort"]


class AreaLinear(nn.Module):
    """A linear layer with `num_areas` independent weight sets and an optional shared path.

    Args:
        in_features: width of the input.
        out_features: width of the output.
        num_areas: number of areas.
        bias: whether each area has a bias.
        shared_path: add a dense linear layer applied to every row beside its area's weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_areas: int,
        bias: bool = True,
        shared_path: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_areas = num_areas
        self.weight = nn.Parameter(torch.empty(num_areas, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_areas, out_features)) if bias else None
        self.shared = nn.Linear(in_features, out_features, bias=bias) if shared_path else None
        # Limitation: only the routed areas get a gradient, but Adam-type optimizers still move
        # an area on steps without samples (decaying moments), and weight decay shrinks all.
        # The areas to use on the next call when the caller cannot pass them (hooked HF modules).
        self.pending_areas: torch.Tensor | None = None
        # Set instead by `AreaSort` when the rows arrive already grouped by area: the size of
        # each area's group, in area order.
        self.pending_groups: tuple[int, ...] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform per area, the same scheme as `nn.Linear`."""
        for area in range(self.num_areas):
            nn.init.kaiming_uniform_(self.weight.data[area], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        num_areas: int,
        shared_path: bool = False,
    ) -> AreaLinear:
        """Upcycle a dense layer: every area starts as a copy of `weight` `[out, in]`.

        With a shared path, the shared weights start at zero so the output is unchanged.

        Pass the dense layer's parameters themselves (not `.data`) to keep what is frozen: the
        area weights take `weight.requires_grad` and the area biases `bias.requires_grad`. The
        shared path is new, but it belongs to the same layer, so it follows the same flags (its
        weight `weight`'s, its bias `bias`'s): a frozen layer converts to a wholly frozen one.
        A plain tensor (`.data`, a copy) is not a parameter and says nothing about training, so
        what is made from it is trainable, as in any new layer.
        """
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, num_areas, bias is not None, shared_path)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.unsqueeze(0).expand_as(layer.weight))
            if bias is not None:
                layer.bias.copy_(bias.unsqueeze(0).expand_as(layer.bias))
            if layer.shared is not None:
                layer.shared.weight.zero_()
                if layer.shared.bias is not None:
                    layer.shared.bias.zero_()
        trains = {"weight": _trains(weight), "bias": bias is not None and _trains(bias)}
        for name, parameter in layer.named_parameters():  # weight, bias, shared.weight, ...
            parameter.requires_grad_(trains[name.rsplit(".", 1)[-1]])
        return layer

    def forward(self, inputs: torch.Tensor, areas: torch.Tensor | None = None) -> torch.Tensor:
        """Apply each row's area. `inputs` is `[..., in]`; `areas` is a LongTensor whose shape is
        a prefix of `inputs.shape[:-1]` (per-sample areas broadcast over a sequence)."""
        if areas is None and self.pending_groups is not None:
            output = self._sorted_matmul(inputs, self.pending_groups)
        else:
            output = self._routed_matmul(inputs, areas)
        if self.shared is not None:
            output = output + self.shared(inputs)
        return output

    def _routed_matmul(self, inputs: torch.Tensor, areas: torch.Tensor | None) -> torch.Tensor:
        if areas is None:
            areas = self.pending_areas
        if areas is None:
            if self.num_areas != 1:
                raise RuntimeError(
                    "AreaLinear with several areas was called without areas: call its router "
                    "first, or pass `areas=`."
                )
            areas = torch.zeros(inputs.shape[:1], dtype=torch.long, device=inputs.device)
        return self._grouped_matmul(inputs, self._expand_areas(areas, inputs))

    def _sorted_matmul(self, inputs: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
        """Rows `[rows, in]` already grouped by area, `group_sizes[k]` rows of area `k`."""
        if inputs.dim() != 2 or inputs.shape[0] != sum(group_sizes):
            raise ValueError(
                f"rows grouped by area must be [{sum(group_sizes)}, {self.in_features}] (the "
                f"group sizes {group_sizes} add up to {sum(group_sizes)}), got "
                f"{tuple(inputs.shape)}: the module between AreaSort's hooks must map each row "
                "on its own."
            )
        return _GroupedLinear.apply(inputs, self.weight, self.bias, None, group_sizes)

    @staticmethod
    def _expand_areas(areas: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        leading = inputs.shape[:-1]
        if areas.shape != leading[: areas.dim()]:
            raise ValueError(
                f"areas of shape {tuple(areas.shape)} do not match inputs of shape "
                f"{tuple(inputs.shape)}: their shape must be a prefix of {tuple(leading)}."
            )
        view = areas.reshape(areas.shape + (1,) * (len(leading) - areas.dim()))
        return view.expand(leading).reshape(-1)

    def _grouped_matmul(self, inputs: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, self.in_features)
        if self.num_areas == 1 or flat.shape[0] == 0:
            output = flat @ self.weight[0].T
            if self.bias is not None:
                output = output + self.bias[0]
            return output.reshape(*inputs.shape[:-1], self.out_features)
        order = torch.argsort(areas, stable=True)
        group_sizes = tuple(torch.bincount(areas, minlength=self.num_areas).tolist())
        output = _GroupedLinear.apply(flat, self.weight, self.bias, order, group_sizes)
        return output.reshape(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_areas={self.num_areas}, bias={self.bias is not None}, "
            f"shared_path={self.shared is not None}"
        )


def _trains(source: torch.Tensor) -> bool:
    """Whether parameters made from `source` train: a parameter's own flag; a plain tensor has
    none (`.data` never requires grad, frozen or not), so they train as new parameters do."""
    return source.requires_grad if isinstance(source, nn.Parameter) else True


def _compute_dtype(inputs: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would compute in: autocast's if it is on, else the weight's."""
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _GroupedLinear(torch.autograd.Function):
    """Rows sorted by area, each contiguous group times its own area's weights, sort undone.

    With `order=None` the rows arrive grouped by area already and leave in that order.

    Written as one autograd function so that the gradients of all areas land in one
    `[num_areas, out, in]` tensor directly: per-area views of the weight (`weight[k]` or
    `unbind`) would make autograd build the same tensor from pieces, at several times the cost.
    Areas without rows get a zero gradient.
    """

    @staticmethod
    def forward(ctx, flat, weight, bias, order, group_sizes):  # noqa: D102
        dtype = _compute_dtype(flat, weight)
        with torch.autocast(flat.device.type, enabled=False):
            rows = (flat if order is None else flat.index_select(0, order)).to(dtype)
            weights = weight.to(dtype)
            output = rows.new_empty(rows.shape[0], weight.shape[1])
            start = 0
            for area, size in enumerate(group_sizes):
                if size:
                    piece = output[start:start + size]
                    if bias is None:
                        torch.mm(rows[start:start + size], weights[area].T, out=piece)
                    else:
                        torch.addmm(bias[area].to(dtype), rows[start:start + size],
                                    weights[area].T, out=piece)
                start += size
            inverse = None if order is None else inverse_permutation(order)
            result = output if order is None else output.index_select(0, inverse)
        ctx.save_for_backward(rows, weight, order, inverse)
        ctx.group_sizes = group_sizes
        ctx.has_bias = bias is not None
        ctx.input_dtype = flat.dtype
        return result

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        rows, weight, order, inverse = ctx.saved_tensors
        dtype = rows.dtype
        grad_rows = (grad_output if order is None else grad_output.index_select(0, order))
        grad_rows = grad_rows.to(dtype)
        weights = weight.to(dtype)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input_sorted = grad_rows.new_empty(rows.shape) if need_input else None
        # Written area by area (in the compute dtype, cast once at the end if it differs).
        grad_weight = grad_rows.new_empty(weight.shape) if need_weight else None
        grad_bias = None
        if need_bias and ctx.has_bias:
            grad_bias = grad_rows.new_empty(weight.shape[:2])
        start = 0
        for area, size in enumerate(ctx.group_sizes):
            grad_piece = grad_rows[start:start + size]
            if need_input and size:
                torch.mm(grad_piece, weights[area], out=grad_input_sorted[start:start + size])
            if need_weight:
                if size:
                    torch.mm(grad_piece.T, rows[start:start + size], out=grad_weight[area])
                else:
                    grad_weight[area].zero_()
            if grad_bias is not None:
                torch.sum(grad_piece, dim=0, out=grad_bias[area])  # zero for an empty area
            start += size
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(weight.dtype)
        grad_input = None
        if need_input:
            if inverse is not None:
                grad_input_sorted = grad_input_sorted.index_select(0, inverse)
            grad_input = grad_input_sorted.to(ctx.input_dtype)
        return grad_input, grad_weight, grad_bias, None, None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """`inverse` with `inverse[order[i]] = i`, so that `x[order][inverse]` is `x`."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _Permute(torch.autograd.Function):
    """`rows[order]`, whose backward is the gather by the inverse permutation (not a scatter)."""

    @staticmethod
    def forward(ctx, rows, order, inverse):  # noqa: D102
        ctx.save_for_backward(inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class AreaSort:
    """Sorts the rows of a token-wise module once for all the area layers inside it.

    An MLP block maps every token on its own, so it may see its tokens in any order: on entry
    the rows are grouped by area (`[rows, in]`), every area layer inside multiplies its groups
    without gathering, and on exit the original order and shape come back. Without it, each
    area layer sorts and unsorts its own rows, which in a transformer MLP moves the 4x-wide
    hidden activations twice more per layer.

    `install(module, area_layers)` registers the hooks; the areas are the area layers'
    `pending_areas`, set by the region's router before the module runs.
    """

    def __init__(self, area_layers: list[AreaLinear]) -> None:
        self.area_layers = area_layers
        self._restore: tuple[torch.Tensor, torch.Tensor, torch.Size] | None = None

    def install(self, module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        return [module.register_forward_pre_hook(self._enter),
                module.register_forward_hook(self._leave)]

    def _enter(self, module: nn.Module, args: tuple) -> tuple | None:
        areas = self.area_layers[0].pending_areas
        if areas is None or not args:
            return None  # one area, or no router: each layer falls back on its own handling
        inputs = args[0]
        flat_areas = AreaLinear._expand_areas(areas, inputs)
        order = torch.argsort(flat_areas, stable=True)
        inverse = inverse_permutation(order)
        num_areas = self.area_layers[0].num_areas
        groups = tuple(torch.bincount(flat_areas, minlength=num_areas).tolist())
        for layer in self.area_layers:
            layer.pending_groups = groups
        self._restore = (order, inverse, inputs.shape[:-1])
        rows = _Permute.apply(inputs.reshape(-1, inputs.shape[-1]), order, inverse)
        return (rows, *args[1:])

    def _leave(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._restore is None:
            return None
        order, inverse, leading = self._restore
        self._restore = None
        for layer in self.area_layers:
            layer.pending_groups = None
        restored = _Permute.apply(output, inverse, order)
        return restored.reshape(*leading, output.shape[-1])
