"""GroupedTopKRouter: DeepSeek-V2/V3 group-limited top-k routing (vLLM's ``grouped_topk``)."""

from __future__ import annotations

from typing import Any

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import (
    AuxLossAssignments,
    GroupScore,
    RouterConfig,
    ScoringFunction,
)

__all__ = ["GroupedTopKRouter"]


class GroupedTopKRouter(RouterBase):
    """Split the E experts into ``n_group`` groups, keep ``topk_group`` groups per token,
    then take the top-k experts among the kept groups.

    Shapes: T tokens, E experts, G = n_group groups of E/G experts, k = top_k.

        scores  = softmax(logits) or sigmoid(logits)                  [T, E]
        choice  = scores + e_score_correction_bias  (if present)      [T, E]
        group   = max(choice per group)              (GroupScore.MAX, DeepSeek-V2)
                  or sum of the top 2 per group      (GroupScore.TOP2_SUM, DeepSeek-V3)  [T, G]
        kept    = topk(group, topk_group)                             [T, topk_group]
        indices = topk(choice with experts of dropped groups = -inf, k)   [T, k]
        weights = scores[indices]   (the bias steers selection only)  [T, k]
        weights /= sum(weights) + 1e-20   if renormalize;  weights *= routed_scaling_factor

    Experts of dropped groups are masked with -inf, as DeepSeek's inference gate and
    vLLM do, so no expert of a dropped group is ever chosen, even when every biased
    score is negative (transformers 4.x filled them with 0.0 instead, which lets such
    experts win over negative biased scores). Ties go to the lower group / expert index.

    Aux loss: by default (``aux_loss_assignments: top_k``) its f_i counts a plain top-k
    of the unbiased probabilities over all experts, as Megatron-core's
    ``compute_routing_scores_for_aux_loss`` and the DeepSeek-V3 paper's balance loss do;
    ``selected`` counts the group-limited, bias-steered experts actually chosen.

    DeepSeek-V3: E=256, n_group=8, topk_group=4, k=8, sigmoid, TOP2_SUM, renormalize,
    scale 2.5, ``use_correction_bias=True``. DeepSeek-V2: E=160, n_group=8,
    topk_group=3, k=6, softmax, MAX, no renormalize, scale 16.
    """

    fixed_k = True

    e_score_correction_bias: torch.Tensor  # [E] fp32, only when use_correction_bias

    def __init__(self, config: RouterConfig, use_correction_bias: bool = False) -> None:
        if not isinstance(use_correction_bias, bool):
            raise RouterConfigurationError(
                f"use_correction_bias: must be True or False, got {use_correction_bias!r}"
            )
        group_size = config.num_experts // config.n_group
        if config.group_score is GroupScore.TOP2_SUM and group_size < 2:
            raise RouterConfigurationError(
                f"group_score: 'top2_sum' needs at least 2 experts per group, got "
                f"num_experts {config.num_experts} / n_group {config.n_group} = {group_size}; "
                "use group_score='max' or fewer groups"
            )
        if config.top_k > config.topk_group * group_size:
            raise RouterConfigurationError(
                f"top_k: must be <= topk_group * experts per group "
                f"({config.topk_group} * {group_size} = {config.topk_group * group_size}), "
                f"got {config.top_k}"
            )
        super().__init__(config)
        self.use_correction_bias = use_correction_bias
        if use_correction_bias:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32)
            )

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Group-limited top-k of flat logits [T, E]; indices/weights [T, k], probs [T, E]."""
        cfg = self.config
        num_tokens, num_experts = logits.shape
        scores = F.score(logits, cfg.scoring)
        choice = scores
        if self.use_correction_bias:
            choice = scores + self.e_score_correction_bias.float()
        grouped = choice.reshape(num_tokens, cfg.n_group, num_experts // cfg.n_group)
        if cfg.group_score is GroupScore.TOP2_SUM:
            group_scores = F.topk_lowest_index(grouped, 2)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept_groups = F.topk_lowest_index(group_scores, cfg.topk_group)[1]
        group_kept = torch.zeros_like(group_scores, dtype=torch.bool)
        group_kept.scatter_(1, kept_groups, True)
        expert_kept = group_kept.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        masked_choice = choice.masked_fill(~expert_kept, float("-inf"))
        indices = F.topk_lowest_index(masked_choice, cfg.top_k)[1]
        weights = scores.gather(1, indices)
        if cfg.renormalize:
            weights = F.renormalize(weights)
        weights = weights * cfg.routed_scaling_factor
        probs = scores if cfg.scoring is ScoringFunction.SOFTMAX else F.renormalize(scores)
        return Selection(indices, weights, probs, {})

    def aux_loss_counts(self, selection: Selection) -> torch.Tensor | None:
        """Megatron's plain top-k of the probabilities [T, E] over all experts (ties to
        the lower index), counted per expert [E]; None (the selection itself) under
        ``aux_loss_assignments: selected`` or when groups and bias change nothing."""
        cfg = self.config
        plain = cfg.n_group == 1 and not self.use_correction_bias
        if plain or cfg.aux_loss_assignments is AuxLossAssignments.SELECTED:
            return None
        return F.top_k_mask(selection.probs, cfg.top_k).sum(dim=0)
