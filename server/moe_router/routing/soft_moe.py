"""SoftMoERouter: fully differentiable soft assignment (Puigcerver et al. 2023, "From Sparse
to Soft Mixtures of Experts"), with its per-expert summary in the token-centric answer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moe_router.errors import RouterConfigurationError
from moe_router.routing.base import RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig

__all__ = ["SoftMoERouter"]


class SoftMoERouter(RouterBase):
    """Each expert owns ``slots_per_expert`` slots; slots are soft mixtures of tokens.

    Shapes: T tokens, D dim, E experts, S slots per expert, E*S slots in all.

        gate    = phi, a Linear(D, E*S) without bias      (weight [E*S, D])
        logits  = x @ phi^T / temperature                  [T, E*S]
        dispatch = softmax over TOKENS for each slot       [T, E*S]  (columns sum to 1)
        combine  = softmax over SLOTS for each token       [T, E*S]  (rows sum to 1)

    The slot inputs are ``dispatch^T @ x`` and the output of token t is
    ``sum_s combine[t, s] * expert_output[s]``; both are returned in
    ``dispatch_weights`` / ``combine_weights`` (flat [T, E*S] even for [B, S, D] input).
    For a [B, S, D] input the dispatch softmax runs over the S tokens of each sequence,
    as the paper does per example; a [T, D] input is one sequence of T tokens.

    Token-centric summary: every token gets all E experts, in expert order 0..E-1
    (k_range (E, E)); the weight
    of expert e is the sum of the token's combine weights over e's slots, so a
    token's weights sum to 1 (times routed_scaling_factor). ``router_logits`` are the
    raw phi logits [..., E*S] (before the temperature). The aux loss is then exactly 1
    (every expert sees every token) and the z-loss is taken over the E*S slot logits.
    ``config.top_k``, ``renormalize`` and ``capacity_factor`` are not used.
    """

    fixed_k = True

    couples_tokens = True

    def __init__(
        self, config: RouterConfig, temperature: float = 1.0, slots_per_expert: int = 1
    ) -> None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise RouterConfigurationError(
                f"temperature: must be a finite number > 0, got {temperature!r}"
            )
        if (
            isinstance(slots_per_expert, bool)
            or not isinstance(slots_per_expert, int)
            or slots_per_expert < 1
        ):
            raise RouterConfigurationError(
                f"slots_per_expert: must be a positive integer, got {slots_per_expert!r}"
            )
        super().__init__(config)
        self.temperature = float(temperature)
        self.slots_per_expert = slots_per_expert
        self.gate = nn.Linear(
            config.hidden_size, config.num_experts * slots_per_expert, bias=False
        )

    @property
    def k_range(self) -> tuple[int, int]:
        """Every token is combined from every expert."""
        return (self.num_experts, self.num_experts)

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Soft assignment from slot logits [T, E*S]; ``lead_shape`` (B, S) makes the
        dispatch softmax per sequence. Returns all E experts per token, weights [T, E]."""
        num_tokens = logits.shape[0]
        num_experts, slots = self.num_experts, self.slots_per_expert
        scaled = logits.float() / self.temperature
        lead = tuple(kwargs.get("lead_shape", (num_tokens,)))
        batch, seq_len = (lead[0], lead[1]) if len(lead) == 2 else (1, num_tokens)
        per_sequence = scaled.reshape(batch, seq_len, num_experts * slots)
        dispatch = torch.softmax(per_sequence, dim=1).reshape(num_tokens, num_experts * slots)
        combine = torch.softmax(scaled, dim=-1)
        expert_weights = combine.reshape(num_tokens, num_experts, slots).sum(dim=-1)
        indices = torch.arange(num_experts, device=logits.device).expand(num_tokens, -1)
        weights = expert_weights * self.config.routed_scaling_factor
        extras = {"dispatch_weights": dispatch, "combine_weights": combine}
        return Selection(indices, weights, expert_weights, extras)
