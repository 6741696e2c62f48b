"""Learned-frozen routing: a learnable projection, frozen prototypes, a hard choice of one area.

A router maps the input of an area layer into a routing space (`routing_dim` wide) with a
learnable linear projection, centres it with a running mean, and picks for each sample (or token)
the area whose frozen prototype has the highest cosine similarity. The projection learns locally,
never through the network: its input is always detached, and its loss pulls each routed vector
toward its chosen prototype while a balance term keeps area usage uniform.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["Router", "make_prototypes", "usage_entropy"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks, differentiable: the gradient of each rank's copy is
    the sum of every rank's output gradient (what `torch.distributed.nn.functional.all_reduce`
    did before its deprecation)."""

    @staticmethod
    def forward(ctx, tensor):  # noqa: D102
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        total = grad.clone()
        dist.all_reduce(total)
        return total


def make_prototypes(num_areas: int, routing_dim: int, seed: int) -> torch.Tensor:
    """Fixed unit-norm prototypes, `[num_areas, routing_dim]`, the same on every machine.

    Orthonormal when `routing_dim >= num_areas`, so areas start as far apart as possible.
    """
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(routing_dim, num_areas), routing_dim, generator=generator)
    if routing_dim >= num_areas:
        orthonormal, _ = torch.linalg.qr(gaussian.T)  # [routing_dim, routing_dim]
        return orthonormal.T[:num_areas].contiguous()
    return F.normalize(gaussian[:num_areas], dim=-1)


def usage_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of the area-usage distribution given per-area counts."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    probs = counts.double() / total
    nonzero = probs[probs > 0]
    return float(-(nonzero * nonzero.log()).sum())


class Router(nn.Module):
    """Chooses one area per sample or per token.

    Call it with the (already detached) input of its area layer, `[..., in_features]`; it returns
    the chosen areas, a LongTensor of the leading shape. With `per_token=False` and a 3-d input
    `[batch, seq, in_features]`, the sequence is averaged first and the result is `[batch]`.
    In training mode it also keeps `self.last_loss`, its local loss for this forward pass.

    `sequence_mask` (`[batch, seq]`, nonzero for real tokens), when a model handler sets it
    before the forward pass, restricts that average to the real tokens, so that a sample's area
    does not depend on how much padding its batch needed. Routed per token, padding tokens still
    get an area but are left out of the centring mean, the usage counts and the local loss.
    """

    def __init__(
        self,
        in_features: int,
        num_areas: int,
        routing_dim: int = 32,
        *,
        seed: int = 0,
        per_token: bool = False,
        temperature: float = 0.1,
        balance_loss_weight: float = 1.0,
        prototype_loss_weight: float = 0.1,
        momentum: float = 0.99,
    ) -> None:
        super().__init__()
        self.num_areas = num_areas
        self.routing_dim = routing_dim
        self.seed = seed
        self.per_token = per_token
        self.temperature = temperature
        self.balance_loss_weight = balance_loss_weight
        self.prototype_loss_weight = prototype_loss_weight
        self.momentum = momentum
        self.projection = nn.Linear(in_features, routing_dim)
        # Frozen prototypes are regenerated from the seed, never saved and never trained.
        self.register_buffer("prototypes", make_prototypes(num_areas, routing_dim, seed), False)
        # The running mean is learned state (like batch-norm statistics), so it is saved.
        self.register_buffer("running_mean", torch.zeros(routing_dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_counts", torch.zeros(num_areas), False)
        self.register_buffer("eval_counts", torch.zeros(num_areas), False)
        self.last_loss: torch.Tensor | None = None
        self.last_areas: torch.Tensor | None = None
        self.sequence_mask: torch.Tensor | None = None

    def reset_frozen_buffers(self) -> None:
        """Regenerate the prototypes from the seed (after loading onto a new device)."""
        prototypes = make_prototypes(self.num_areas, self.routing_dim, self.seed)
        self.prototypes = prototypes.to(self.projection.weight.device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.detach()
        real = None  # which routed rows are real tokens, when per-token rows include padding
        if not self.per_token and inputs.dim() == 3:
            inputs = self._sequence_mean(inputs)
        elif inputs.dim() == 3:
            real = self._real_tokens(inputs)
        flat = inputs.reshape(-1, inputs.shape[-1])
        projected = self.projection(flat.to(self.projection.weight.dtype)).float()
        if self.training and torch.is_grad_enabled():
            self._update_running_mean(_rows(projected.detach(), real))
        # Limitation: evaluation centres with the mean kept from training batches. With a small
        # momentum and a body that moves fast (the 1B recipe: momentum 0, SGD 0.5) that mean is
        # one update behind the final weights, and evaluation routes less evenly than training
        # did (docs/results.md, 1B section).
        centred = F.normalize(projected - self.running_mean.float(), dim=-1)
        similarity = centred @ self.prototypes.float().T  # [tokens, num_areas], cosines
        areas = similarity.argmax(dim=-1)
        # Padding tokens get an area (their rows go through the area layers like any row) but
        # no say in the centring, the usage counts or the routers' loss.
        self._count(_rows(areas, real))
        if self.training and torch.is_grad_enabled():
            self.last_loss = self._local_loss(_rows(similarity, real), _rows(areas, real))
        self.last_areas = areas.reshape(inputs.shape[:-1])
        return self.last_areas

    def _sequence_mean(self, inputs: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, in]` -> `[batch, in]`: each sequence's mean over its real tokens."""
        # Limitation: without `sequence_mask` (set by the BERT, GPT-2 and Llama handlers; a
        # custom handler must call `hand_padding_mask`), the mean includes padding tokens,
        # whose number depends on the rest of the batch.
        mask = self.sequence_mask
        if mask is None:
            return inputs.mean(dim=1)
        check_sequence_mask(mask, inputs, "the routed input")
        # Any nonzero entry is a real token, as for the model's attention (not a weight).
        weights = (mask != 0).to(device=inputs.device, dtype=inputs.dtype).unsqueeze(-1)
        return (inputs * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _real_tokens(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """`[batch * seq]` booleans, True for real tokens, or None to count every token: no
        mask, no padding, or a batch of padding only (whose every token then counts, as without
        a mask)."""
        mask = self.sequence_mask
        if mask is None:
            return None
        check_sequence_mask(mask, inputs, "the routed input")
        real = (mask != 0).reshape(-1).to(inputs.device)
        kept = int(real.sum())
        return real if 0 < kept < real.numel() else None

    def _update_running_mean(self, projected: torch.Tensor) -> None:
        batch_sum = projected.sum(dim=0)
        count = torch.tensor(float(projected.shape[0]), device=projected.device)
        if _distributed():
            # Keep every rank's routing identical: all ranks run every router on every step.
            stacked = torch.cat([batch_sum, count.view(1)])
            dist.all_reduce(stacked)
            batch_sum, count = stacked[:-1], stacked[-1]
        batch_mean = batch_sum / count
        with torch.no_grad():
            if self.num_batches_tracked == 0:
                self.running_mean.copy_(batch_mean)
            else:
                batch_mean = batch_mean.to(self.running_mean.dtype)
                self.running_mean.lerp_(batch_mean, 1.0 - self.momentum)
            self.num_batches_tracked += 1

    def _local_loss(self, similarity: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        # Pull each routed vector toward its chosen prototype: 1 - cosine, averaged.
        chosen = similarity.gather(1, areas.unsqueeze(1)).squeeze(1)
        prototype_loss = (1.0 - chosen).mean()
        # Balance: KL divergence of the mean soft assignment from the uniform distribution.
        assignment_sum = (similarity / self.temperature).softmax(dim=-1).sum(dim=0)
        count = torch.tensor(float(similarity.shape[0]), device=similarity.device)
        if _distributed():
            # The mean over the global batch, differentiably: with gradients averaged over
            # ranks, this gives exactly the single-process gradient.
            assignment_sum = _SumOverRanks.apply(assignment_sum)
            dist.all_reduce(count)
        mean_assignment = assignment_sum / count
        # An area no sample leans to at all (softmax underflow, from a temperature of 0.01 on)
        # has a share of exactly 0, whose term is 0; an unclamped log would make it 0 * -inf, a
        # NaN loss whose NaN gradient the global gradient norm spreads to every parameter.
        tiny = torch.finfo(mean_assignment.dtype).tiny
        ratio = (mean_assignment * self.num_areas).clamp_min(tiny)
        balance_loss = (mean_assignment * ratio.log()).sum()
        return self.prototype_loss_weight * prototype_loss + self.balance_loss_weight * balance_loss

    def _count(self, areas: torch.Tensor) -> None:
        counts = torch.bincount(areas, minlength=self.num_areas).to(self.train_counts.dtype)
        if self.training:
            self.train_counts += counts
        else:
            self.eval_counts += counts

    def take_usage(self, split: str = "train") -> torch.Tensor:
        """Return the per-area counts since the last call for `split` and reset them."""
        buffer = self.train_counts if split == "train" else self.eval_counts
        counts = buffer.clone()
        buffer.zero_()
        return counts

    def extra_repr(self) -> str:
        level = "token" if self.per_token else "sample"
        return f"num_areas={self.num_areas}, routing_dim={self.routing_dim}, routing={level}"


def check_sequence_mask(mask: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    """Refuse a padding mask that is not `[batch, seq]` of `tensor` (`[batch, seq, width]`)."""
    if tuple(mask.shape) != tuple(tensor.shape[:2]):
        raise ValueError(
            f"sequence_mask has shape {tuple(mask.shape)} but {what} is "
            f"{tuple(tensor.shape)}; the mask must be [batch, seq] of the same input."
        )


def _rows(tensor: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The rows of `tensor` that `keep` selects, or all of them."""
    return tensor if keep is None else tensor[keep]


def max_entropy(num_areas: int) -> float:
    """The entropy of uniform usage, log(num_areas)."""
    return math.log(num_areas)
