"""RouterConfig: the typed, validated arguments every router shares, and their small enums.

``RoutingMethod`` (the router kinds) is defined with its table in
:mod:`moe_router.routing.kinds` and re-exported here, where the seed had it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moe_router.errors import RouterConfigurationError
from moe_router.routing.kinds import RoutingMethod

__all__ = ["RoutingMethod", "ScoringFunction", "DropPolicy", "GroupScore", "RouterConfig"]


class ScoringFunction(str, Enum):
    """How gate logits become scores: softmax over experts or an independent sigmoid."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class DropPolicy(str, Enum):
    """Which assignments an over-capacity expert keeps: highest probability, or earliest token."""

    PROBS = "probs"
    POSITION = "position"


class GroupScore(str, Enum):
    """How an expert group is scored: its best expert (DeepSeek-V2) or sum of its top two (V3)."""

    MAX = "max"
    TOP2_SUM = "top2_sum"


def _enum(enum_type: type[Enum], value: object, name: str) -> Enum:
    if isinstance(value, enum_type):
        return value
    allowed = ", ".join(repr(m.value) for m in enum_type)  # type: ignore[attr-defined]
    try:
        return enum_type(value)
    except ValueError:
        raise RouterConfigurationError(
            f"{name}: must be one of {allowed}, got {value!r}"
        ) from None


@dataclass(frozen=True)
class RouterConfig:
    """Arguments shared by every router; checked at construction.

    hidden_size: input dimension D of the hidden states (gate weight is [E, D]).
    num_experts: number of routed experts E.
    top_k: experts per token k (expert-choice and Soft MoE ignore it).
    routing_method: the router kind (informational; each router class fixes its own).
    scoring: ``softmax`` or ``sigmoid`` applied to the fp32 gate logits.
    renormalize: rescale the k chosen weights to sum to 1 (HF ``norm_topk_prob``).
    routed_scaling_factor: multiply the final weights (DeepSeek's scale).
    jitter_noise: train-time multiplicative input noise in [1-eps, 1+eps] (Mixtral).
    n_group / topk_group: group-limited routing; groups kept per token.
    group_score: ``max`` (DeepSeek-V2) or ``top2_sum`` (DeepSeek-V3).
    capacity_factor: if set, each expert keeps at most ceil(T*k/E*factor) assignments.
    drop_policy: which assignments survive capacity: ``probs`` or ``position``.
    gate_bias: a bias on the gate linear layer (rare; off in every reference model).
    """

    hidden_size: int
    num_experts: int
    top_k: int = 2
    routing_method: RoutingMethod = RoutingMethod.TOP_K
    scoring: ScoringFunction = ScoringFunction.SOFTMAX
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    jitter_noise: float = 0.0
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = GroupScore.MAX
    capacity_factor: float | None = None
    drop_policy: DropPolicy = DropPolicy.PROBS
    gate_bias: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "routing_method", _enum(RoutingMethod, self.routing_method, "routing_method"))
        set_(self, "scoring", _enum(ScoringFunction, self.scoring, "scoring"))
        set_(self, "group_score", _enum(GroupScore, self.group_score, "group_score"))
        set_(self, "drop_policy", _enum(DropPolicy, self.drop_policy, "drop_policy"))
        _positive_int(self.hidden_size, "hidden_size")
        _positive_int(self.num_experts, "num_experts")
        _positive_int(self.top_k, "top_k")
        if self.top_k > self.num_experts:
            raise RouterConfigurationError(
                f"top_k: must be <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if not self.routed_scaling_factor > 0:
            raise RouterConfigurationError(
                f"routed_scaling_factor: must be > 0, got {self.routed_scaling_factor}"
            )
        if not 0.0 <= self.jitter_noise < 1.0:
            raise RouterConfigurationError(
                f"jitter_noise: must be in [0, 1), got {self.jitter_noise}"
            )
        _positive_int(self.n_group, "n_group")
        _positive_int(self.topk_group, "topk_group")
        if self.num_experts % self.n_group:
            raise RouterConfigurationError(
                f"n_group: must divide num_experts ({self.num_experts}), got {self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise RouterConfigurationError(
                f"topk_group: must be <= n_group ({self.n_group}), got {self.topk_group}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise RouterConfigurationError(
                f"capacity_factor: must be > 0 or None, got {self.capacity_factor}"
            )


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterConfigurationError(f"{name}: must be a positive integer, got {value!r}")
