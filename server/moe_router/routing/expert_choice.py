"""ExpertChoiceRouter: each expert picks its tokens (Zhou et al. 2022, "Mixture-of-Experts
with Expert Choice Routing"), answered token-centric like every other router."""

from __future__ import annotations

from typing import Any

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase
from moe_router.routing.capacity import expert_capacity
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig, ScoringFunction

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(RouterBase):
    """Every expert takes the ``capacity`` tokens that score it highest.

    Shapes: T tokens of this call (all of them: a [B, S, D] input is one group of
    B*S tokens), E experts, C capacity.

        scores  = softmax(logits) over experts                          [T, E]
        C       = tokens_per_expert, or ceil(capacity_factor * T / E)   (factor 1.0 if
                  config.capacity_factor is None), clamped to T
        chosen  = for each expert, its top-C tokens by score            [E, C]
                  (ties -> the lower token index)
        answer  = turned token-centric: token t gets the experts that chose it, largest
                  score first, 0..E of them; k_max = the largest count in the call
                  (at least 1); weights = those scores, renormalised over the token's
                  experts only if config.renormalize (the paper does not: set
                  renormalize=False to follow it), times routed_scaling_factor.

    ``config.top_k`` is not used. The decision for one token depends on the others, so
    ``couples_tokens`` is True: the serving layer never merges calls, and the shared
    capacity step is skipped (capacity is the algorithm itself).

    Aux loss: the Switch formula E * sum_i f_i * P_i with f_i the fraction of this
    call's assignments taken by expert i. Every expert takes exactly C tokens, so f_i
    = 1/E and the loss is exactly 1 (its balanced value): expert choice is balanced
    by construction and the loss carries no gradient.
    """

    couples_tokens = True

    def __init__(self, config: RouterConfig, tokens_per_expert: int | None = None) -> None:
        if tokens_per_expert is not None and (
            isinstance(tokens_per_expert, bool)
            or not isinstance(tokens_per_expert, int)
            or tokens_per_expert < 1
        ):
            raise RouterConfigurationError(
                f"tokens_per_expert: must be a positive integer or None, got {tokens_per_expert!r}"
            )
        if config.scoring is not ScoringFunction.SOFTMAX:
            raise RouterConfigurationError(
                f"scoring: expert choice scores with a softmax over experts; "
                f"must be 'softmax', got {config.scoring.value!r}"
            )
        super().__init__(config)
        self.tokens_per_expert = tokens_per_expert

    @property
    def k_range(self) -> tuple[int, int]:
        """A token may be chosen by no expert or by all of them."""
        return (0, self.num_experts)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes in a call of ``num_tokens`` tokens (clamped to T)."""
        if self.tokens_per_expert is not None:
            capacity = self.tokens_per_expert
        else:
            factor = 1.0 if self.config.capacity_factor is None else self.config.capacity_factor
            capacity = expert_capacity(num_tokens, 1, self.num_experts, factor)
        return min(capacity, num_tokens)

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Experts pick tokens from flat logits [T, E]; returns the token-centric
        indices/weights [T, k_max] (-1 / 0 padded) and probs [T, E]."""
        num_tokens, num_experts = logits.shape
        scores = F.score(logits, ScoringFunction.SOFTMAX)
        capacity = self.capacity(num_tokens)
        token_ids = F.topk_lowest_index(scores.t(), capacity)[1]  # [E, C]
        chosen = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=logits.device)
        chosen.scatter_(1, token_ids, True)
        chosen = chosen.t()  # [T, E]
        k_max = max(int(chosen.sum(dim=1).max()) if num_tokens else 0, 1)
        # Chosen experts first, by descending score (ties -> lower expert index).
        ranked = torch.where(chosen, scores, torch.full_like(scores, -1.0))
        rank_values, indices = F.topk_lowest_index(ranked, k_max)
        is_real = rank_values >= 0
        indices = torch.where(is_real, indices, torch.full_like(indices, -1))
        weights = torch.where(is_real, scores.gather(1, indices.clamp(min=0)), 0.0)
        if self.config.renormalize:
            weights = F.renormalize(weights)
        weights = weights * self.config.routed_scaling_factor
        return Selection(indices, weights, scores, {})

    def compute_aux_loss(
        self, router_logits_or_probs: torch.Tensor, expert_indices: torch.Tensor
    ) -> torch.Tensor:
        """Switch loss with f_i = expert i's share of this call's assignments (exactly 1 here)."""
        probs = router_logits_or_probs.float()
        counts = F.tokens_per_expert(expert_indices, self.num_experts).to(probs.dtype)
        total = counts.sum()
        if probs.shape[0] == 0 or total == 0:
            return probs.new_zeros(())
        return self.num_experts * torch.sum(counts / total * probs.mean(dim=0))
