"""GroupedTopKRouter: DeepSeek-V2/V3 group-limited top-k routing (vLLM's ``grouped_topk``)."""

from __future__ import annotations

from typing import ClassVar

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import scoring
from moe_router.routing.router_config import GroupScore, RouterConfig
from moe_router.routing.topk import TopKRouter

__all__ = ["GroupedTopKRouter"]


class GroupedTopKRouter(TopKRouter):
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

    Experts of dropped groups are masked with -inf by default (``group_mask_fill``
    ``neg_inf``), as DeepSeek's inference gate and vLLM do, so no expert of a dropped
    group is ever chosen, even when every biased score is negative; ``zero`` fills them
    with 0.0 as transformers' DeepSeek-V2, Mistral 4 and AXK2 routers (and 4.x's V3)
    do, which lets such experts win over negative biased scores. Ties go to the lower
    group / expert index. Everything else (scoring, bias placement, weights) is
    :class:`TopKRouter`'s pipeline.

    DeepSeek-V3: E=256, n_group=8, topk_group=4, k=8, sigmoid, TOP2_SUM, renormalize,
    scale 2.5, ``use_correction_bias=True``. DeepSeek-V2: E=160, n_group=8,
    topk_group=3, k=6, softmax, MAX, no renormalize, scale 16.
    """

    _fuses_selection: ClassVar[bool] = True  # fused_topk.topk_select computes it too

    def __init__(self, config: RouterConfig, use_correction_bias: bool = False) -> None:
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
        super().__init__(config, use_correction_bias)

    def restrict_choice(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask the experts outside each token's ``topk_group`` best groups: [T, E] -> [T, E]."""
        cfg = self.config
        return scoring.mask_dropped_groups(
            choice, cfg.n_group, cfg.topk_group, cfg.group_score, cfg.group_mask_fill
        )
