"""RouterConfig: the typed, validated arguments every router shares, and their small enums.

``RoutingMethod`` (the router kinds) is defined with its table in
:mod:`moe_router.routing.kinds` and re-exported here, where the seed had it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moe_router.errors import RouterConfigurationError
from moe_router.routing.kinds import RoutingMethod

__all__ = [
    "RoutingMethod",
    "ScoringFunction",
    "DropPolicy",
    "GroupScore",
    "CapacityScope",
    "CapacityPriority",
    "AuxLossAssignments",
    "RouterConfig",
]


class ScoringFunction(str, Enum):
    """How gate logits become scores: softmax over experts or an independent sigmoid."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class DropPolicy(str, Enum):
    """Which assignments an over-capacity expert keeps: highest weight, or earliest token.

    ``probs`` ranks an expert's assignments by their final combine weight (after
    renormalisation and scaling), as Megatron-core's ``apply_router_token_dropping``
    does; under ``CapacityPriority.SLOT`` it ranks tokens by their first choice's router
    probability instead (V-MoE's batch prioritized routing, NLLB-MoE's
    ``batch_prioritized_routing``). ``position`` keeps the earliest tokens.
    """

    PROBS = "probs"
    POSITION = "position"


class GroupScore(str, Enum):
    """How an expert group is scored: its best expert (DeepSeek-V2) or sum of its top two (V3)."""

    MAX = "max"
    TOP2_SUM = "top2_sum"


class CapacityScope(str, Enum):
    """Which tokens share an expert's capacity: all of a call's, or each sequence's.

    ``call``: the T tokens of a call (Megatron-core, NLLB-MoE). ``sequence``: each row of a
    [B, S, D] input has its own capacity over its S tokens (Switch Transformers counts
    ``expert_capacity`` per sequence); a [T, D] input is one sequence.
    """

    CALL = "call"
    SEQUENCE = "sequence"


class CapacityPriority(str, Enum):
    """In which order assignments claim capacity.

    ``expert``: each expert ranks all of its assignments together, first and second
    choices alike (Megatron-core's ``apply_router_token_dropping``). ``slot``: every
    token's first choice claims capacity before any token's second choice, and so on
    (GShard, Switch Transformers, NLLB-MoE's ``locations2 += sum(top_1_mask)``).
    """

    EXPERT = "expert"
    SLOT = "slot"


class AuxLossAssignments(str, Enum):
    """Which expert assignments the aux loss counts (its f_i), always before dropping.

    ``top_k``: a plain top-k of the unbiased probabilities over all experts, as
    Megatron-core's ``compute_routing_scores_for_aux_loss`` and the DeepSeek-V3 paper's
    balance loss count. ``selected``: the experts the router actually chose (for the
    grouped router: group-limited and steered by the correction bias), so the loss
    reflects the load the routing really put on each expert.
    """

    TOP_K = "top_k"
    SELECTED = "selected"


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
    capacity_factor: if set, each expert keeps at most ceil(T*k/E*factor) assignments
        (T: the tokens sharing a capacity, see capacity_scope; Megatron's
        ``get_capacity``).
    drop_policy: which assignments survive capacity: ``probs`` or ``position``.
    expert_capacity: an absolute capacity per expert instead of a factor (Switch
        Transformers' and NLLB-MoE's ``expert_capacity``); not with capacity_factor.
    capacity_scope: ``call`` (all tokens of a call share it) or ``sequence`` (each row of
        a [B, S, D] input has its own, as Switch Transformers).
    capacity_priority: ``expert`` (Megatron: each expert ranks all its assignments) or
        ``slot`` (every first choice before any second choice: GShard, Switch, NLLB-MoE).
    renormalize_after_drop: the kept weights of a token are renormalised to sum to
        routed_scaling_factor after dropping (NLLB-MoE's
        ``normalize_router_prob_before_dropping=False``); needs renormalize.
    pad_to_capacity: answer each expert's token list padded to its capacity
        (``RouterOutput.expert_tokens`` [E, G*C]), the fixed shapes expert-parallel
        dispatchers need (Megatron's ``moe_pad_expert_input_to_capacity``).
    aux_loss_assignments: what the aux loss counts: ``top_k`` (Megatron, default) or
        ``selected`` (the grouped router's own, biased, group-limited choice).
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
    expert_capacity: int | None = None
    capacity_scope: CapacityScope = CapacityScope.CALL
    capacity_priority: CapacityPriority = CapacityPriority.EXPERT
    renormalize_after_drop: bool = False
    pad_to_capacity: bool = False
    aux_loss_assignments: AuxLossAssignments = AuxLossAssignments.TOP_K
    gate_bias: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "routing_method", _enum(RoutingMethod, self.routing_method, "routing_method"))
        set_(self, "scoring", _enum(ScoringFunction, self.scoring, "scoring"))
        set_(self, "group_score", _enum(GroupScore, self.group_score, "group_score"))
        set_(self, "drop_policy", _enum(DropPolicy, self.drop_policy, "drop_policy"))
        set_(self, "capacity_scope",
             _enum(CapacityScope, self.capacity_scope, "capacity_scope"))
        set_(self, "capacity_priority",
             _enum(CapacityPriority, self.capacity_priority, "capacity_priority"))
        set_(self, "aux_loss_assignments",
             _enum(AuxLossAssignments, self.aux_loss_assignments, "aux_loss_assignments"))
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
        self._check_capacity()

    @property
    def drops_tokens(self) -> bool:
        """True when a capacity is set (capacity_factor or expert_capacity)."""
        return self.capacity_factor is not None or self.expert_capacity is not None

    def _check_capacity(self) -> None:
        """The capacity options make sense together (messages name the key to change)."""
        if self.expert_capacity is not None:
            _positive_int(self.expert_capacity, "expert_capacity")
            if self.capacity_factor is not None:
                raise RouterConfigurationError(
                    "expert_capacity: give capacity_factor or expert_capacity, not both "
                    f"(got capacity_factor {self.capacity_factor} and expert_capacity "
                    f"{self.expert_capacity})"
                )
        for name in ("renormalize_after_drop", "pad_to_capacity"):
            if not isinstance(getattr(self, name), bool):
                raise RouterConfigurationError(
                    f"{name}: must be true or false, got {getattr(self, name)!r}"
                )
        if self.drops_tokens:
            if self.renormalize_after_drop and not self.renormalize:
                raise RouterConfigurationError(
                    "renormalize_after_drop: needs renormalize: true (it moves the "
                    "renormalisation after dropping); set renormalize or remove this key"
                )
            return
        for name, default in (
            ("capacity_scope", CapacityScope.CALL),
            ("capacity_priority", CapacityPriority.EXPERT),
            ("renormalize_after_drop", False),
            ("pad_to_capacity", False),
        ):
            if getattr(self, name) != default:
                raise RouterConfigurationError(
                    f"{name}: only applies with a capacity; set capacity_factor or "
                    "expert_capacity, or remove this key"
                )


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterConfigurationError(f"{name}: must be a positive integer, got {value!r}")
