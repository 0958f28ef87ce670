"""The one token-centric answer every router gives (DESIGN.md, "The answer is token-centric")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from moe_router_client.frozen_init import fast_init

__all__ = ["LOGIT_BOUND", "RouterOutput", "Selection", "TENSOR_FIELDS"]

LOGIT_BOUND = 1.8e19
"""Largest gate logit magnitude a router's answer is trusted with: about the square root
of float32's largest value, so the z-loss (the logits squared) stays finite."""


class Selection(NamedTuple):
    """What a router's selection step hands back to the shared pipeline (flat tokens).

    indices: [T, k] int64 expert ids, -1 where a slot is unused.
    weights: [T, k] float32 combine weights, 0 where unused.
    routing_probs: [T, E] float32 routing probabilities used for the aux loss, or a
             function computing them when they cost ops of their own (sigmoid routers
             renormalise their scores): only calls that want the losses pay for them.
    extras:  optional tensors keyed by RouterOutput field name
             (complexity_scores [T], dispatch_weights, combine_weights, ...).
    counts:  [E] int64 assignments per expert, when the selection step counted them
             already (the fused CPU op); None: the pipeline counts.
    logits_bounded: whether every logit the selection read was finite and below
             :data:`LOGIT_BOUND` in magnitude, when it checked on the way (the fused CPU
             op); None: not checked.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    routing_probs: torch.Tensor | Callable[[], torch.Tensor]
    extras: dict[str, Any]
    counts: torch.Tensor | None = None
    logits_bounded: bool | None = None

    @property
    def probs(self) -> torch.Tensor:
        """The routing probabilities [T, E] (computed now when given as a function)."""
        probs = self.routing_probs
        return probs if isinstance(probs, torch.Tensor) else probs()


@fast_init  # built once or twice a call: 0.6 against 1.6 us
@dataclass(frozen=True)
class RouterOutput:
    """Token-centric routing result; leading dims follow the input ([T] or [B, S]).

    expert_indices:        int32   [..., k_max]  chosen experts, padded with -1
    expert_weights:        float32 [..., k_max]  combine weights, 0 where padded
    num_experts_per_token: int32   [...]         how many of the k_max slots are real
    router_logits:         float32 [..., E]      raw gate logits
    tokens_per_expert:     int64   [E]           assignments kept per expert in this call
    dropped_tokens:        int                   assignments dropped by capacity
    aux_loss / z_loss:     float32 scalars       Switch load-balancing loss, router z-loss
    complexity_scores:     float32 [...]         dynamic routers only
    dispatch_weights:      float32 [T, E*slots]  Soft MoE only (softmax over tokens per slot)
    combine_weights:       float32 [T, E*slots]  Soft MoE only (softmax over slots per token)
    expert_tokens:         int32   [E, G*C]      with pad_to_capacity only: the tokens each
                           expert processes, as flat token indices (row of the input
                           reshaped to [T, D]); capacity group g (a sequence under
                           capacity_scope ``sequence``, else the whole call, G=1) in
                           columns g*C .. g*C+C-1, in token order, padded with -1. The
                           expert-centric view of the same kept assignments, in fixed
                           shapes for expert-parallel dispatchers.
    expert_token_weights:  float32 [E, G*C]      the combine weight of each of those
                           (token, expert) pairs, 0 where padded
    logits_bounded:        bool or None          every router logit finite and below
                           LOGIT_BOUND in magnitude, when the router checked on the way
                           (the fused CPU ops do, at no cost); None: not checked
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    num_experts_per_token: torch.Tensor
    router_logits: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: int = 0
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    complexity_scores: torch.Tensor | None = None
    dispatch_weights: torch.Tensor | None = None
    combine_weights: torch.Tensor | None = None
    expert_tokens: torch.Tensor | None = None
    expert_token_weights: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    logits_bounded: bool | None = None

    @property
    def k_max(self) -> int:
        """Width of the padded expert dimension."""
        return int(self.expert_indices.shape[-1])

    @property
    def num_experts(self) -> int:
        """Number of experts the router chose among."""
        return int(self.tokens_per_expert.shape[0])

    def detach(self) -> RouterOutput:
        """The same answer with every tensor cut from the autograd graph."""
        def cut(value: Any) -> Any:
            return value.detach() if isinstance(value, torch.Tensor) else value

        return replace(
            self,
            **{name: cut(getattr(self, name)) for name in TENSOR_FIELDS},
        )

    def to(self, device: torch.device | str) -> RouterOutput:
        """The same answer with every tensor moved to ``device``."""
        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return replace(self, **{name: move(getattr(self, name)) for name in TENSOR_FIELDS})


TENSOR_FIELDS = (  # every tensor field of RouterOutput (a test keeps the two in step)
    "expert_indices",
    "expert_weights",
    "num_experts_per_token",
    "router_logits",
    "tokens_per_expert",
    "aux_loss",
    "z_loss",
    "complexity_scores",
    "dispatch_weights",
    "combine_weights",
    "expert_tokens",
    "expert_token_weights",
)
