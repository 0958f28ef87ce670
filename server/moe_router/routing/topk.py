"""TopKRouter: the per-token top-k gate (Mixtral, Qwen-MoE, OLMoE, MiniMax-M2, Gemma 4, ...)."""

from __future__ import annotations

import math
from typing import Any

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import functional as F
from moe_router.routing import scoring
from moe_router.routing.base import RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import (
    AuxLossAssignments,
    CorrectionBiasTarget,
    RouterConfig,
    ScoringFunction,
)

__all__ = ["TopKRouter"]


class TopKRouter(RouterBase):
    """Score every expert, keep the k best per token.

    Shapes: T tokens, E experts (E_r routed, S = ``scored_shared_experts``), k = top_k.

        logits  = gate(x), with the base's input norm / multiplier / soft cap   [T, E]
        scores  = softmax | sigmoid | sqrtsoftplus (logits)                      [T, E]
        choice  = scores[:, :E_r] (+ e_score_correction_bias)  (bias on ``scores``)
                | logits[:, :E_r] + e_score_correction_bias     (bias on ``logits``)
        choice  = :meth:`restrict_choice` (choice)      (groups: GroupedTopKRouter)
        indices = topk(choice, k)                       [T, k]  (ties -> lower index)
        weights = scores[indices]  (the bias steers selection only)
        weights /= sum(weights) + renormalize_eps       if renormalize
                   (with S shared experts: k + S slots, their scores in the sum too)
        weights *= per_expert_scale[indices]            (Gemma 4)
        weights *= routed_scaling_factor  (* weight_scale, Inkling's global_scale)

    Mixtral is softmax + renormalize; Qwen2/3-MoE and OLMoE softmax with
    norm_topk_prob as configured; routers that take the top-k of the logits and softmax
    only those (GPT-OSS, Granite, JetMoE) are softmax + renormalize, the same numbers.
    ``use_correction_bias`` adds the ``e_score_correction_bias`` [E_r] buffer
    (DeepSeek-V3's ``noaux_tc`` without groups: Ernie 4.5, MiniMax-M2, HunYuan-V3).
    """

    fixed_k = True
    values_judged_by_logits = True

    e_score_correction_bias: torch.Tensor  # [E_r] fp32, only when use_correction_bias

    def __init__(self, config: RouterConfig, use_correction_bias: bool = False) -> None:
        if not isinstance(use_correction_bias, bool):
            raise RouterConfigurationError(
                f"use_correction_bias: must be True or False, got {use_correction_bias!r}"
            )
        if (config.correction_bias_target is CorrectionBiasTarget.LOGITS
                and not use_correction_bias):
            raise RouterConfigurationError(
                "correction_bias_target: 'logits' places the e_score_correction_bias; it "
                "needs use_correction_bias: true"
            )
        super().__init__(config)
        self.use_correction_bias = use_correction_bias
        # A softmax top-k chosen on the scores sums to at least its top-1 score, about
        # 1/E: at least 2^-(c + 1) with c = ceil(log2 E) (a binade of margin for
        # rounding), whose float32 half-ulp is at least 2^-(c + 25). An eps below
        # 2^-(c + 26) rounds away (s + eps is s), so the addition is skipped: one op
        # less (Mixtral's 1e-20 against 2^-29 for E = 8).
        self._eps_vanishes = (
            config.scoring is ScoringFunction.SOFTMAX
            and config.routed_experts == config.num_experts
            and config.renormalize_eps < 2.0 ** -(math.ceil(math.log2(config.num_experts)) + 26)
        )
        if use_correction_bias:
            self.register_buffer(
                "e_score_correction_bias",
                torch.zeros(config.routed_experts, dtype=torch.float32),
            )

    @property
    def k_range(self) -> tuple[int, int]:
        """(k + S, k + S): the routed experts and the scored shared ones."""
        k = self.config.top_k + self.config.scored_shared_experts
        return (k, k)

    def restrict_choice(self, choice: torch.Tensor) -> torch.Tensor:
        """Hook before the top-k: choice [T, E_r] -> [T, E_r]; all experts stay here."""
        return choice

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Top-k of flat logits [T, E]; indices/weights [T, k(+S)], probs [T, E]."""
        cfg = self.config
        routed = cfg.routed_experts
        scores = F.score(logits, cfg.scoring)
        choice = scores[:, :routed] if routed < cfg.num_experts else scores
        if self.use_correction_bias:
            bias = self.e_score_correction_bias  # an fp32 buffer
            if cfg.correction_bias_target is CorrectionBiasTarget.LOGITS:
                choice = logits[:, :routed].float() + bias
            else:
                choice = choice + bias
        restricted = self.restrict_choice(choice)
        top_values, indices = F.topk_lowest_index(restricted, cfg.top_k)
        # Selected on the scores themselves: the top-k values are the weights (no gather).
        chosen = top_values if restricted is scores else None
        eps = cfg.renormalize_eps
        if chosen is not None and self._eps_vanishes:
            eps = 0.0
        indices, weights = scoring.combine_weights(
            scores, indices, routed_experts=routed, renormalize=cfg.renormalize,
            eps=eps, chosen=chosen,
        )
        if cfg.per_expert_scale:
            weights = weights * self.per_expert_scale.float()[indices]
        if cfg.routed_scaling_factor != 1.0:  # w * 1.0 is w
            weights = weights * cfg.routed_scaling_factor
        if cfg.learned_weight_scale:
            weights = weights * self.weight_scale.float()
        if cfg.scoring is ScoringFunction.SOFTMAX:
            return Selection(indices, weights, scores, {})
        return Selection(indices, weights, lambda: F.renormalize(scores), {})

    def aux_loss_counts(self, selection: Selection) -> torch.Tensor | None:
        """Megatron's plain top-k of the probabilities [T, E] over all experts (ties to
        the lower index), counted per expert [E]; None (the selection itself) under
        ``aux_loss_assignments: selected`` or when neither groups nor a correction bias
        steer the selection away from the probabilities."""
        cfg = self.config
        plain = cfg.n_group == 1 and not self.use_correction_bias
        if plain or cfg.aux_loss_assignments is AuxLossAssignments.SELECTED:
            return None
        return F.top_k_mask(selection.probs, cfg.top_k).sum(dim=0)
