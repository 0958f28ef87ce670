"""RouterConfig: the typed, validated arguments every router shares, and their small enums.

``RoutingMethod`` (the router kinds) is defined with its table in
:mod:`moe_router.routing.kinds` and re-exported here, where the seed had it.
"""

from __future__ import annotations

import math
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
    "GroupMaskFill",
    "CorrectionBiasTarget",
    "InputNorm",
    "RouterConfig",
]


class ScoringFunction(str, Enum):
    """How gate logits become scores [T, E].

    ``softmax`` over the experts; ``sigmoid`` per expert; ``sqrtsoftplus`` per expert,
    sqrt(log(1 + e^x)) (DeepSeek-V4's ``scoring_func``, transformers'
    ``SqrtSoftplusActivation``).
    """

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    SQRTSOFTPLUS = "sqrtsoftplus"


class DropPolicy(str, Enum):
    """Which assignments an over-capacity expert keeps: highest probability, or earliest token."""

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


class GroupMaskFill(str, Enum):
    """What the experts of dropped groups are masked with before the final top-k.

    ``neg_inf``: never chosen (DeepSeek's inference gate, vLLM, transformers 5.x for
    DeepSeek-V3). ``zero``: 0.0, as transformers' DeepSeek-V2, Mistral 4 and AXK2 code
    does; with sigmoid scores plus a negative correction bias a masked expert (0.0)
    can then beat a kept one, so the two differ exactly there.
    """

    NEG_INF = "neg_inf"
    ZERO = "zero"


class CorrectionBiasTarget(str, Enum):
    """What ``e_score_correction_bias`` [E] is added to before the top-k (selection only).

    ``scores``: topk(score(logits) + bias) (DeepSeek-V3 ``noaux_tc``, Ernie 4.5,
    MiniMax-M2); ``logits``: topk(logits + bias) (Kolibri 1). Either way the weights
    come from the unbiased scores.
    """

    SCORES = "scores"
    LOGITS = "logits"


class InputNorm(str, Enum):
    """A normalisation of the router input x [T, D] before the gate.

    ``none``; ``rms``: x * (mean(x^2) + eps)^-1/2 * input_scale * D^-1/2, with a learned
    ``input_scale`` [D] (Gemma 4's ``Gemma4TextRouter``: an RMSNorm without weight,
    then ``scale`` and ``hidden_size**-0.5``).
    """

    NONE = "none"
    RMS = "rms"


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
    gate_bias: a bias [E] on the gate linear layer (GPT-OSS's router, Longcat's
        ``router_bias``).
    group_mask_fill: ``neg_inf`` or ``zero`` for the experts of dropped groups
        (:class:`GroupMaskFill`).
    correction_bias_target: ``scores`` or ``logits`` (:class:`CorrectionBiasTarget`),
        for routers that have an ``e_score_correction_bias``.
    logit_multiplier: logits *= m before scoring (MuseSpark's ``output_multiplier``).
    logit_softcap: c > 0: logits = tanh(logits / c) * c before scoring (Laguna's
        ``moe_router_logit_softcapping``); None for none.
    renormalize_eps: the eps of w / (sum w + eps) (1e-20 DeepSeek; Lfm2 1e-6,
        MuseSpark 1e-15; Mixtral divides by the bare sum, identical in fp32).
    input_norm / input_norm_eps: the normalisation of the router input
        (:class:`InputNorm`; Gemma 4: ``rms`` with its ``rms_norm_eps``).
    per_expert_scale: weights[t, j] *= per_expert_scale[indices[t, j]], a learned [E]
        (Gemma 4's ``router.per_expert_scale``).
    learned_weight_scale: weights *= a learned scalar ``weight_scale`` [1] (Inkling's
        ``gate.global_scale``), after ``routed_scaling_factor``.
    scored_shared_experts: S > 0: the last S of the E experts are shared experts the
        gate also scores (its last S rows, Inkling's ``InklingTopkRouter``). Every token
        takes them after its k routed ones, so answers have k + S slots; their scores
        join the normalisation: w_j = s_j / (sum of the k routed s + sum of the S shared s).
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
    group_mask_fill: GroupMaskFill = GroupMaskFill.NEG_INF
    correction_bias_target: CorrectionBiasTarget = CorrectionBiasTarget.SCORES
    logit_multiplier: float = 1.0
    logit_softcap: float | None = None
    renormalize_eps: float = 1e-20
    input_norm: InputNorm = InputNorm.NONE
    input_norm_eps: float = 1e-6
    per_expert_scale: bool = False
    learned_weight_scale: bool = False
    scored_shared_experts: int = 0

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
        set_(self, "group_mask_fill",
             _enum(GroupMaskFill, self.group_mask_fill, "group_mask_fill"))
        set_(self, "correction_bias_target",
             _enum(CorrectionBiasTarget, self.correction_bias_target, "correction_bias_target"))
        set_(self, "input_norm", _enum(InputNorm, self.input_norm, "input_norm"))
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
        self._check_score_options()

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

    @property
    def routed_experts(self) -> int:
        """Experts chosen by top-k: E minus the scored shared experts."""
        return self.num_experts - self.scored_shared_experts

    def _check_score_options(self) -> None:
        """The checks of the scoring and weighting options (issue 13's router options)."""
        if not (math.isfinite(self.logit_multiplier) and self.logit_multiplier > 0):
            raise RouterConfigurationError(
                f"logit_multiplier: must be a finite number > 0, got {self.logit_multiplier}"
            )
        cap = self.logit_softcap
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise RouterConfigurationError(
                f"logit_softcap: must be a finite number > 0, or null for none, got {cap}"
            )
        if not (math.isfinite(self.renormalize_eps) and 0 <= self.renormalize_eps < 1):
            raise RouterConfigurationError(
                f"renormalize_eps: must be in [0, 1), got {self.renormalize_eps}"
            )
        if not (math.isfinite(self.input_norm_eps) and 0 < self.input_norm_eps < 1):
            raise RouterConfigurationError(
                f"input_norm_eps: must be in (0, 1), got {self.input_norm_eps}"
            )
        for name in ("per_expert_scale", "learned_weight_scale", "gate_bias"):
            if not isinstance(getattr(self, name), bool):
                raise RouterConfigurationError(
                    f"{name}: must be true or false, got {getattr(self, name)!r}"
                )
        shared = self.scored_shared_experts
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise RouterConfigurationError(
                f"scored_shared_experts: must be an integer >= 0, got {shared!r}"
            )
        if shared and self.top_k > self.num_experts - shared:
            raise RouterConfigurationError(
                f"scored_shared_experts: leaves {self.num_experts - shared} routed experts "
                f"of num_experts {self.num_experts}, fewer than top_k {self.top_k}"
            )
        if shared and self.scoring is ScoringFunction.SOFTMAX:
            raise RouterConfigurationError(
                "scored_shared_experts: needs per-expert scores (scoring 'sigmoid' or "
                "'sqrtsoftplus'); a softmax would make the shared experts' scores depend "
                "on the routed ones"
            )
        if shared and not self.renormalize:
            raise RouterConfigurationError(
                "scored_shared_experts: only changes the normalisation; it needs "
                "renormalize: true"
            )
        if shared and self.n_group > 1:
            raise RouterConfigurationError(
                "scored_shared_experts: is not combined with group-limited routing "
                "(n_group > 1) by any reference model; use n_group: 1"
            )


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterConfigurationError(f"{name}: must be a positive integer, got {value!r}")
