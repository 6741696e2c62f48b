"""Direct feedback: fixed random matrices carry the output error to every hidden region.

With `e = dL/d(logits)`, `[..., num_outputs]`, region `l` receives `delta_l = e @ B_l`, with `B_l`
`[num_outputs, width_l]` fixed, random and scaled by `feedback_scale / sqrt(num_outputs)`. Three
variants:

- one matrix per region (`feedback="region"`);
- one matrix per area of a region (`feedback="area"`): the sample's area picks the matrix;
- compressed (`feedback_rank=r`): one shared fixed `R`, `[num_outputs, r]`, then per region (or
  area) `[r, width_l]`, so a 50k vocabulary costs one 50k x r matrix, not one per region.
  With `feedback_blocks=m`, `R` is block-diagonal: the outputs are cut into `m` slices of
  consecutive ids, slice `j` compressed by its own Gaussian to coordinates `j r/m .. (j+1) r/m`.
  The rank stays `r`, the work of `e @ R` falls to `1/m`; and the interference between outputs
  stays the same in the mean: an output shares its slice with `num_outputs/m` others in `r/m`
  dimensions, the same `num_outputs/r` outputs per dimension as a dense `R`.

The matrices are buffers regenerated from a seed, never saved and never trained. Two identity
functions put them on the autograd graph: `FeedbackInjector` on each region's output and
`FeedbackTap` on the logits. In the backward pass the tap passes the logits' gradient on to the
head and publishes the output error; each injector, when autograd reaches its region, replaces
the region's gradient by `delta_l`. So one `backward()` yields the whole SAL update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DirectFeedback", "ErrorSignal", "FeedbackInjector", "FeedbackTap"]


def _random_matrix(shape: tuple[int, ...], scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale


class DirectFeedback(nn.Module):
    """The fixed feedback matrices of every region of one model.

    Args:
        num_outputs: width of the model's output (classes, or vocabulary size).
        region_widths: width of each region's output, in region order.
        region_areas: number of feedback matrices per region: its number of areas with
            `feedback="area"`, else 1.
        rank: width of the shared compression, or None for direct `num_outputs x width` matrices.
        blocks: number of diagonal blocks of the compression (it must divide `rank`).
        scale: multiplier on the 1/sqrt(fan-in) scale.
        seed: seed of every matrix (each matrix derives its own from it).
    """

    def __init__(
        self,
        num_outputs: int,
        region_widths: Sequence[int],
        region_areas: Sequence[int],
        *,
        rank: int | None = None,
        blocks: int = 1,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(region_widths) != len(region_areas):
            raise ValueError(
                f"region_widths has {len(region_widths)} entries but region_areas has "
                f"{len(region_areas)}; give one of each per region."
            )
        _check_blocks(num_outputs, rank, blocks)
        self.num_outputs = num_outputs
        self.region_widths = list(region_widths)
        self.region_areas = list(region_areas)
        self.rank = rank
        self.blocks = blocks
        self.scale = scale
        self.seed = seed
        self.reset_frozen_buffers()

    @property
    def signal_width(self) -> int:
        """Width of the error each region matrix reads: the rank if compressed, else outputs."""
        return self.rank if self.rank is not None else self.num_outputs

    def reset_frozen_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)generate every matrix from the seed, identically on every machine."""
        if self.rank is not None:
            # Dense: `[num_outputs, rank]`. Block-diagonal: only the diagonal blocks are stored,
            # stacked as `[num_outputs, rank / blocks]`; row i belongs to output i's slice.
            compression = _random_matrix(
                (self.num_outputs, self.rank // self.blocks),
                1.0 / math.sqrt(self.num_outputs / self.blocks), self.seed,
            )
            self.register_buffer("compression", compression.to(device), persistent=False)
        else:
            self.compression = None
        region_scale = self.scale / math.sqrt(self.signal_width)
        pairs = zip(self.region_widths, self.region_areas, strict=True)
        for index, (width, areas) in enumerate(pairs):
            shape = (areas, self.signal_width, width)
            matrix = _random_matrix(shape, region_scale, self.seed + 7919 * (index + 1))
            self.register_buffer(f"region_{index}", matrix.to(device), persistent=False)

    def matrices(self, region: int) -> torch.Tensor:
        """The feedback matrices of `region`, `[areas, signal_width, width]`."""
        return getattr(self, f"region_{region}")

    def compress(self, error: torch.Tensor) -> torch.Tensor:
        """Apply the shared compression (if any) to the output error `[..., num_outputs]`."""
        # At least float32 (a bfloat16 error is upcast), float64 kept for exact checks.
        error = error.to(torch.promote_types(error.dtype, torch.float32))
        if self.compression is None:
            return error
        compression = self.compression.to(error.dtype)
        if self.blocks == 1:
            return error @ compression
        # Slices of a 2-d view are strided, not copied: each product reads its slice in place.
        flat = error.reshape(-1, self.num_outputs)
        bounds = [block * self.num_outputs // self.blocks for block in range(self.blocks + 1)]
        pieces = [flat[:, start:stop] @ compression[start:stop]
                  for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat(pieces, dim=-1).reshape(*error.shape[:-1], self.rank)

    def region_signal(
        self,
        signal: torch.Tensor,
        region: int,
        areas: torch.Tensor | None,
        hidden_shape: torch.Size,
        sequence_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`delta` for one region, shaped like its output `hidden_shape`.

        `signal` is the (compressed) error, `[*lead, signal_width]`, where `lead` is a prefix of
        `hidden_shape[:-1]`: sample-level errors are broadcast over a region's sequence, to the
        tokens that `sequence_mask` (`hidden_shape[:2]`, nonzero for real tokens) keeps if given.
        An error that is already per token is left as it is: a padding token's error is its own.
        """
        delta = self._region_delta(signal, region, areas, hidden_shape)
        if sequence_mask is not None and signal.dim() < len(hidden_shape):
            # Any nonzero entry is a real token, as for the model's attention (not a weight).
            keep = (sequence_mask != 0).to(device=delta.device, dtype=delta.dtype)
            delta = delta * keep.reshape(keep.shape + (1,) * (len(hidden_shape) - keep.dim()))
        return delta

    def _region_delta(self, signal, region, areas, hidden_shape) -> torch.Tensor:
        matrices = self.matrices(region).to(signal.dtype)
        lead = hidden_shape[:-1]
        if matrices.shape[0] == 1:
            return _expand_lead(signal @ matrices[0], lead, features=True)
        if areas is None:
            raise RuntimeError(f"region {region} has area-specific feedback but no areas recorded.")
        flat_signal = _expand_lead(signal, lead, features=True).reshape(-1, signal.shape[-1])
        flat_areas = _expand_lead(areas, lead, features=False).reshape(-1)
        delta = signal.new_empty(flat_signal.shape[0], hidden_shape[-1])
        for area in range(matrices.shape[0]):
            rows = (flat_areas == area).nonzero(as_tuple=True)[0]
            if rows.numel():
                delta[rows] = flat_signal[rows] @ matrices[area]
        return delta.reshape(hidden_shape)


def _check_blocks(num_outputs: int, rank: int | None, blocks: int) -> None:
    if blocks == 1:
        return
    if rank is None:
        raise ValueError(
            f"feedback_blocks={blocks} splits the compression, but there is none: set "
            "feedback_rank too, or feedback_blocks=1."
        )
    if rank % blocks or blocks > num_outputs:
        raise ValueError(
            f"feedback_blocks={blocks} must divide feedback_rank={rank} and be at most the "
            f"number of outputs ({num_outputs})."
        )


def _expand_lead(tensor: torch.Tensor, lead: torch.Size, features: bool) -> torch.Tensor:
    """Broadcast `tensor` over the missing trailing dims of `lead` (a view, no copy).

    With `features=True` the tensor is `[*prefix, width]` and becomes `[*lead, width]`; else it is
    `[*prefix]` and becomes `[*lead]`. `prefix` must be a prefix of `lead`.
    """
    prefix = tensor.shape[:-1] if features else tensor.shape
    missing = len(lead) - len(prefix)
    if missing == 0:
        return tensor
    tail = tensor.shape[-1:] if features else torch.Size()
    view = tensor.reshape(prefix + (1,) * missing + tail)
    return view.expand(lead + tail)


class ErrorSignal:
    """The compressed output error of one forward pass, set during its backward pass."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class FeedbackTap(torch.autograd.Function):
    """Identity on the logits; its backward publishes the output error to the regions.

    `apply(feedback, signal, logits, *hidden)`, `hidden[l]` being region `l`'s output as
    `FeedbackInjector` returned it. The gradient of the logits passes through unchanged to the
    head; the compressed error goes into `signal`; each region output gets a zero gradient that
    costs no memory (an expanded scalar), only so that autograd runs the region's injector.
    """

    @staticmethod
    def forward(ctx, feedback, signal, logits, *hidden):  # noqa: D102
        ctx.feedback = feedback
        ctx.signal = signal
        ctx.hidden_meta = [(h.shape, h.dtype, h.device) for h in hidden]
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):  # noqa: D102
        ctx.signal.value = ctx.feedback.compress(grad_logits)
        zeros = [torch.zeros((), dtype=dtype, device=device).expand(shape)
                 for shape, dtype, device in ctx.hidden_meta]
        return (None, None, grad_logits, *zeros)


class FeedbackInjector(torch.autograd.Function):
    """Identity on one region's output; in backward its gradient is `delta_l = e @ B_l`.

    `apply(feedback, signal, region, areas, hidden[, sequence_mask])`; `sequence_mask` keeps a
    sample-level error off padding tokens. Each region computes its `delta` when autograd
    reaches it, so the deltas of all regions are never held at once: with streamed (recomputed)
    regions, the backward pass holds one region's activations and one `delta`.
    """

    @staticmethod
    def forward(ctx, feedback, signal, region, areas, hidden, sequence_mask=None):  # noqa: D102
        ctx.feedback = feedback
        ctx.signal = signal
        ctx.region = region
        ctx.areas = areas
        ctx.sequence_mask = sequence_mask
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):  # noqa: D102
        if ctx.signal.value is None:
            raise RuntimeError(
                "a SAL region output received a gradient that did not come from the model's "
                "logits; region outputs may only reach the loss through the head."
            )
        shape, dtype = ctx.hidden_meta
        delta = ctx.feedback.region_signal(
            ctx.signal.value, ctx.region, ctx.areas, shape, ctx.sequence_mask
        )
        return None, None, None, None, delta.to(dtype), None
