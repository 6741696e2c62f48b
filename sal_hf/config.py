"""The SAL settings of a model: training method, number of areas, routing and feedback."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SALConfig", "Method", "RoutingLevel", "FeedbackMode"]

Method = Literal["sal", "dfa", "bp"]
RoutingLevel = Literal["sample", "token"]
FeedbackMode = Literal["region", "area"]

# The number of areas a method uses when `num_areas` is left unset.
_DEFAULT_AREAS = {"sal": 16, "dfa": 1, "bp": 1}
# Seeds are below 2**32 (what numpy and `transformers.set_seed` accept too). Routers and
# feedback matrices seed their generators with `seed + 104729 * (index + 1)` and
# `seed + 7919 * (index + 1)`; from below 2**32 these stay far inside the 2**64 torch accepts.
SEED_LIMIT = 2**32
_REAL_FIELDS = (
    "router_temperature", "balance_loss_weight", "prototype_loss_weight", "router_momentum",
    "feedback_scale",
)


@dataclass
class SALConfig:
    """How a model is trained by SAL. Stored in the model config as `sal_config` (a dict).

    Args:
        method: `"sal"` (areas, routing and regional feedback), `"dfa"` (one area, no routing,
            direct feedback alignment) or `"bp"` (the same model trained by ordinary backprop).
        num_areas: areas per area layer. Unset means 16 for `sal` and 1 for `dfa` and `bp`.
            `sal` needs at least 2, `dfa` exactly 1.
        routing: `"sample"` routes each sample to one area (a sequence by the mean over its
            tokens); `"token"` routes every token on its own (language models). With one area
            (`dfa`, and `bp` unless `num_areas` is set) there is no router and both values do
            the same; either is accepted, so one command line serves every method.
        routing_dim: width of the learned routing space the prototypes live in; at least 2
            when there are several areas. From `num_areas` on, the prototypes are orthogonal.
        router_temperature: softmax temperature of the soft assignment used only by the balance
            term (the routing decision itself is a hard arg-max).
        balance_loss_weight: weight of the term that keeps area usage uniform.
        prototype_loss_weight: weight of the term that pulls a routed vector toward its chosen
            prototype.
        router_momentum: momentum of the running mean that centres the routing space.
        feedback: `"region"` gives each region one fixed feedback matrix; `"area"` gives every
            area of a region its own, picked by the sample's area (`sal` only).
        feedback_rank: when set, the output error is first compressed by one shared fixed matrix
            (num_outputs x feedback_rank), then each region has a small (feedback_rank x width)
            matrix. Use it for vocabulary-sized outputs.
        feedback_blocks: make that compression block-diagonal with this many blocks (each slice
            of consecutive outputs to `feedback_rank / feedback_blocks` coordinates): the same
            rank at `1 / feedback_blocks` of the work. Must divide `feedback_rank`. Unset: 1, or
            chosen together with the rank when `convert_to_sal` chooses it.
        feedback_scale: multiplier on the 1/sqrt(fan-in) scale of the feedback matrices.
        shared_path: add an always-on dense path beside the selective area path of each area
            layer, so every sample also trains shared features.
        seed: seed from which prototypes and feedback matrices are regenerated, an integer in
            [0, 2**32).

    The float settings take any finite real number (stored as `float`); `shared_path` takes a
    `bool` only, so that a string such as `"no"` is not read as true.
    """

    method: Method = "sal"
    num_areas: int | None = None
    routing: RoutingLevel = "sample"
    routing_dim: int = 32
    router_temperature: float = 0.1
    balance_loss_weight: float = 1.0
    prototype_loss_weight: float = 0.1
    router_momentum: float = 0.99
    feedback: FeedbackMode = "region"
    feedback_rank: int | None = None
    feedback_blocks: int | None = None
    feedback_scale: float = 1.0
    shared_path: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_choices()
        if self.num_areas is None:
            self.num_areas = _DEFAULT_AREAS[self.method]
        self._check_numbers()
        self._check_consistency()

    def _check_choices(self) -> None:
        for name in ("method", "routing", "feedback"):
            field_type = typing.get_type_hints(SALConfig)[name]
            allowed = typing.get_args(field_type)
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"SALConfig.{name}={value!r} is not supported; use one of {allowed}."
                )

    def _check_numbers(self) -> None:
        # Integers of other types (numpy's, from a sweep) are stored as plain ints, so that the
        # config stays JSON-serialisable and equal to one built from the same values.
        for name in ("num_areas", "routing_dim", "feedback_rank", "feedback_blocks", "seed"):
            value = getattr(self, name)
            if _is_int(value) and type(value) is not int:
                setattr(self, name, int(value))
        positive_ints = {"num_areas": self.num_areas, "routing_dim": self.routing_dim}
        for name in ("feedback_rank", "feedback_blocks"):
            if getattr(self, name) is not None:
                positive_ints[name] = getattr(self, name)
        for name, value in positive_ints.items():
            if not _is_int(value) or value < 1:
                raise ValueError(f"SALConfig.{name} must be an integer >= 1, got {value!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(
                f"SALConfig.seed must be an integer in [0, 2**32), got {self.seed!r}: the seeds "
                "derived from it for each router and feedback matrix must fit torch's generator."
            )
        if not isinstance(self.shared_path, bool):
            raise ValueError(
                f"SALConfig.shared_path must be True or False, got {self.shared_path!r}."
            )
        for name in _REAL_FIELDS:
            setattr(self, name, _finite_float(name, getattr(self, name)))
        for name in ("router_temperature", "feedback_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SALConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        if self.router_temperature < _FLOAT32_TINY:
            # The balance term divides cosines by it in float32: below float32's smallest
            # normal number the quotient overflows, and the softmax gives NaN.
            raise ValueError(
                f"SALConfig.router_temperature must be at least {_FLOAT32_TINY!r} (float32's "
                f"smallest normal number; routing computes in float32), got "
                f"{self.router_temperature!r}."
            )
        for name in ("balance_loss_weight", "prototype_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SALConfig.{name} must be >= 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.router_momentum < 1.0:
            raise ValueError(
                f"SALConfig.router_momentum must be in [0, 1), got {self.router_momentum!r}."
            )

    def _check_consistency(self) -> None:
        if self.method == "dfa" and self.num_areas != 1:
            raise ValueError(
                f"method='dfa' means one area and no routing, but num_areas={self.num_areas}; "
                "leave num_areas unset or use method='sal'."
            )
        if self.method == "sal" and self.num_areas == 1:
            raise ValueError(
                "method='sal' with num_areas=1 has nothing to route: that is method='dfa'. "
                "Use method='dfa' or num_areas >= 2."
            )
        blocks = self.feedback_blocks
        if self.feedback_rank is not None and blocks is not None and self.feedback_rank % blocks:
            raise ValueError(
                f"feedback_blocks={self.feedback_blocks} must divide "
                f"feedback_rank={self.feedback_rank}."
            )
        if self.feedback == "area" and self.num_areas == 1:
            raise ValueError(
                "feedback='area' needs several areas, but num_areas=1; use feedback='region'."
            )
        if self.feedback == "area" and not self.uses_feedback:
            raise ValueError(
                f"feedback='area' gives each area its own feedback matrix, but method='bp' "
                f"trains by backprop and uses no feedback (num_areas={self.num_areas}). Use "
                "method='sal' for per-area feedback, or feedback='region' with method='bp'."
            )
        # Refused rather than warned about: the router picks the prototype of highest cosine
        # similarity, and in one dimension every cosine is +1 or -1, so at most two areas (the
        # first prototype of each sign) could ever be chosen. From two dimensions on, each
        # unit-norm prototype wins for the inputs that point its way, so every area stays
        # reachable when routing_dim < num_areas (the prototypes are then spread out rather
        # than orthogonal); that is accepted without a warning.
        if self.uses_routing and self.routing_dim == 1:
            raise ValueError(
                f"routing_dim=1 cannot route among num_areas={self.num_areas} areas: in one "
                "dimension every cosine with a prototype is +1 or -1, so at most 2 areas could "
                "ever be chosen. Use routing_dim >= 2 (the default is 32)."
            )
        # `routing` is accepted with one area, where there is no router: both values then do
        # the same, and refusing one would make the token-routing default of the causal-LM
        # recipe an error for `dfa` and `bp`.

    @property
    def uses_feedback(self) -> bool:
        """True when hidden regions learn from fixed feedback instead of backprop."""
        return self.method != "bp"

    @property
    def uses_routing(self) -> bool:
        """True when area layers have more than one area and therefore a router."""
        return self.num_areas > 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SALConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown SALConfig fields {unknown}; known fields are {sorted(known)}."
            )
        return cls(**values)


_FLOAT32_TINY = 2.0**-126  # torch.finfo(torch.float32).tiny


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite_float(name: str, value: Any) -> float:
    """`value` as a float, if it is a finite real number (a bool or a string is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"SALConfig.{name} must be a real number, got {value!r} ({type(value).__name__}); "
            f"pass it as a float, e.g. {name}=0.5."
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"SALConfig.{name} must be finite, got {value!r}.")
    return number
