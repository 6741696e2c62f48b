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

__all__ = ["AreaLinear"]


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
        return layer

    def forward(self, inputs: torch.Tensor, areas: torch.Tensor | None = None) -> torch.Tensor:
        """Apply each row's area. `inputs` is `[..., in]`; `areas` is a LongTensor whose shape is
        a prefix of `inputs.shape[:-1]` (per-sample areas broadcast over a sequence)."""
        if areas is None:
            areas = self.pending_areas
        if areas is None:
            if self.num_areas != 1:
                raise RuntimeError(
                    "AreaLinear with several areas was called without areas: call its router "
                    "first, or pass `areas=`."
                )
            areas = torch.zeros(inputs.shape[:1], dtype=torch.long, device=inputs.device)
        output = self._grouped_matmul(inputs, self._expand_areas(areas, inputs))
        if self.shared is not None:
            output = output + self.shared(inputs)
        return output

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


def _compute_dtype(inputs: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would compute in: autocast's if it is on, else the weight's."""
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _GroupedLinear(torch.autograd.Function):
    """Rows sorted by area, each contiguous group times its own area's weights, sort undone.

    Written as one autograd function so that the gradients of all areas land in one
    `[num_areas, out, in]` tensor directly: per-area views of the weight (`weight[k]` or
    `unbind`) would make autograd build the same tensor from pieces, at several times the cost.
    Areas without rows get a zero gradient.
    """

    @staticmethod
    def forward(ctx, flat, weight, bias, order, group_sizes):  # noqa: D102
        dtype = _compute_dtype(flat, weight)
        with torch.autocast(flat.device.type, enabled=False):
            rows = flat.index_select(0, order).to(dtype)
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
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            result = output.index_select(0, inverse)
        ctx.save_for_backward(rows, weight, order, inverse)
        ctx.group_sizes = group_sizes
        ctx.has_bias = bias is not None
        ctx.input_dtype = flat.dtype
        return result

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        rows, weight, order, inverse = ctx.saved_tensors
        dtype = rows.dtype
        grad_rows = grad_output.index_select(0, order).to(dtype)
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
            grad_input = grad_input_sorted.index_select(0, inverse).to(ctx.input_dtype)
        return grad_input, grad_weight, grad_bias, None, None
