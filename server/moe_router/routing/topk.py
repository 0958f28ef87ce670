"""TopKRouter: the standard per-token top-k gate (Mixtral, Qwen2/3-MoE, OLMoE)."""

from __future__ import annotations

from typing import Any

import torch

from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase
from moe_router.routing.output import Selection

__all__ = ["TopKRouter"]


class TopKRouter(RouterBase):
    """Score every expert, keep the k best per token.

    scores = softmax(logits) or sigmoid(logits)          [T, E]
    weights, indices = topk(scores, k)                   [T, k]  (ties -> lower index)
    weights /= sum(weights)   if renormalize             (HF norm_topk_prob)
    weights *= routed_scaling_factor

    Mixtral is softmax + renormalize; Qwen2/3-MoE and OLMoE softmax with
    norm_topk_prob as configured.
    """

    fixed_k = True

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        scores = F.score(logits, self.config.scoring)
        weights, indices = F.topk_lowest_index(scores, self.config.top_k)
        if self.config.renormalize:
            weights = F.renormalize(weights)
        weights = weights * self.config.routed_scaling_factor
        probs = scores if self.config.scoring.value == "softmax" else F.renormalize(scores)
        return Selection(indices, weights, probs, {})
