"""Token dropping: how many assignments each expert keeps, which ones, and the padded
per-expert token lists that expert-parallel dispatchers need.

Shape legend: T tokens of a call, k slots per token, A = T*k assignments (assignment
``a = t*k + j`` is slot j of token t), E experts, G capacity groups (1, or the B
sequences of a [B, S, D] input under ``CapacityScope.SEQUENCE``) of T/G consecutive
tokens each, C the capacity of one expert in one group.

    C       = expert_capacity, or ceil(T/G * k / E * capacity_factor)    (Megatron get_capacity)
    order   = the A assignments, most entitled first                      (priority_order)
    rank    = position of an assignment among those of its (group, expert) in that order
    kept    = rank < C;  dropped slots become index -1, weight 0
    weights = kept / sum(kept) * routed_scaling_factor   if renormalize_after_drop (NLLB-MoE)

References: Megatron-core 0.19 ``moe_utils.get_capacity`` and
``apply_router_token_dropping`` (expert priority, ``probs``/``position`` policies,
``pad_to_capacity``); Switch Transformers (Fedus et al. 2021) and transformers'
``SwitchTransformersTop1Router`` (top-1, absolute capacity per sequence, token order);
NLLB-MoE (NLLB Team 2022) and transformers' ``NllbMoeTop2Router`` (slot-major priority,
batch prioritized routing of V-MoE, Riquelme et al. 2021, renormalisation after dropping).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moe_router.routing.router_config import (
    CapacityPriority,
    CapacityScope,
    DropPolicy,
    RouterConfig,
)

__all__ = [
    "Dropped",
    "expert_capacity",
    "capacity_for",
    "capacity_groups",
    "priority_order",
    "rank_in_bucket",
    "apply_capacity",
    "drop_for_config",
]


class Dropped(NamedTuple):
    """What token dropping leaves of a selection.

    indices: [T, k] int64, -1 where a slot was dropped (or was padding already).
    weights: [T, k] float32, 0 there; renormalised over the kept slots if asked.
    dropped: how many real assignments were dropped.
    expert_tokens: [E, G*C] int64 or None: with pad_to_capacity, the tokens each expert
        processes (flat token index into the call), group g's in columns g*C..g*C+C-1 in
        token order, padded with -1.
    expert_token_weights: [E, G*C] float32 or None: the combine weight of each of those
        (token, expert) pairs, 0 where padded.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    dropped: int
    expert_tokens: torch.Tensor | None = None
    expert_token_weights: torch.Tensor | None = None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may keep: ceil(T * k / E * capacity_factor) (Megatron's
    ``get_capacity(num_tokens * topk, E, factor)``, same float operations)."""
    return int(math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def capacity_for(config: RouterConfig, group_tokens: int, top_k: int) -> int:
    """C for one group of ``group_tokens`` tokens: ``config.expert_capacity`` when set,
    else :func:`expert_capacity` of the factor. Needs ``config.drops_tokens``."""
    if config.expert_capacity is not None:
        return config.expert_capacity
    if config.capacity_factor is None:
        raise ValueError("capacity_for needs capacity_factor or expert_capacity")
    return expert_capacity(group_tokens, top_k, config.num_experts, config.capacity_factor)


def capacity_groups(scope: CapacityScope, lead: tuple[int, ...]) -> int:
    """G: 1 for ``call``; for ``sequence`` the B rows of a [B, S] lead (1 for a [T] lead)."""
    if scope is CapacityScope.SEQUENCE and len(lead) == 2:
        return lead[0]
    return 1


def priority_order(
    indices: torch.Tensor,
    weights: torch.Tensor,
    probs: torch.Tensor,
    policy: DropPolicy,
    priority: CapacityPriority,
) -> torch.Tensor:
    """The A = T*k assignment ids (``t*k + j``), most entitled to capacity first.

    indices/weights: [T, k] selection (slot 0 the token's first choice); probs: [T, E].

    - ``expert`` + ``probs``: by final combine weight, descending (Megatron); ties to the
      earlier token, then the lower slot.
    - ``expert`` + ``position``: token order, then slot.
    - ``slot`` + ``position``: slot-major, every first choice before any second choice,
      tokens in order inside a slot (GShard, Switch, NLLB-MoE).
    - ``slot`` + ``probs``: slot-major, tokens inside a slot by the router probability of
      their first choice, descending, ties to the earlier token (V-MoE's batch
      prioritized routing, NLLB-MoE's ``batch_prioritized_routing``).
    """
    num_tokens, k = indices.shape
    device = indices.device
    if priority is CapacityPriority.EXPERT:
        if policy is DropPolicy.PROBS:
            return torch.sort(-weights.detach().reshape(-1).float(), stable=True).indices
        return torch.arange(num_tokens * k, device=device)
    if policy is DropPolicy.PROBS and num_tokens:
        first = probs.detach().float().gather(1, indices[:, :1].clamp(min=0)).reshape(-1)
        tokens = torch.sort(-first, stable=True).indices  # [T], most important first
    else:
        tokens = torch.arange(num_tokens, device=device)
    slots = torch.arange(k, device=device).unsqueeze(1)  # [k, 1]
    return (tokens.unsqueeze(0) * k + slots).reshape(-1)  # [k*T], slot-major


def rank_in_bucket(bucket: torch.Tensor, order: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """For each element a, its position among the elements of its bucket in ``order``.

    bucket: [A] int64 in [0, num_buckets]; order: [A] a permutation of arange(A).
    Returns [A] int64 (0 for the first element of each bucket in ``order``).
    """
    sorted_buckets = torch.sort(bucket[order], stable=True)
    grouped = order[sorted_buckets.indices]
    counts = torch.bincount(sorted_buckets.values, minlength=num_buckets + 1)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(grouped.numel(), device=bucket.device)
    rank_sorted = positions - starts[sorted_buckets.values]
    rank = torch.empty_like(rank_sorted)
    rank[grouped] = rank_sorted
    return rank


def apply_capacity(
    indices: torch.Tensor,
    weights: torch.Tensor,
    capacity: int,
    policy: DropPolicy = DropPolicy.PROBS,
    *,
    num_experts: int,
    probs: torch.Tensor | None = None,
    priority: CapacityPriority = CapacityPriority.EXPERT,
    num_groups: int = 1,
    renormalize_after_drop: bool = False,
    scaling: float = 1.0,
    pad_to_capacity: bool = False,
) -> Dropped:
    """Keep at most ``capacity`` assignments per expert and group; drop the rest.

    indices/weights: [T, k] (-1 / 0 where a slot is unused); probs: [T, E], needed only
    for ``slot`` + ``probs`` priority. Groups are ``num_groups`` runs of T/G consecutive
    tokens, each with its own capacity. ``renormalize_after_drop`` rescales each token's
    kept weights to sum to ``scaling`` (a token that lost every slot keeps 0s).
    See :func:`priority_order` for who wins; :class:`Dropped` for what comes back.
    """
    num_tokens, k = indices.shape
    device = indices.device
    if probs is None:
        if priority is CapacityPriority.SLOT and policy is DropPolicy.PROBS:
            raise ValueError("slot priority with the probs policy needs probs")
        probs = weights.new_zeros(num_tokens, num_experts)
    group_size = num_tokens // num_groups if num_groups else num_tokens
    if num_groups * group_size != num_tokens:
        raise ValueError(f"{num_groups} groups do not divide {num_tokens} tokens")
    flat_expert = indices.reshape(-1)
    valid = flat_expert >= 0
    token = torch.arange(num_tokens, device=device).repeat_interleave(k)
    group = token // max(group_size, 1)
    padding_bucket = num_groups * num_experts
    bucket = torch.where(valid, group * num_experts + flat_expert, padding_bucket)
    order = priority_order(indices, weights, probs, policy, priority)
    rank = rank_in_bucket(bucket, order, padding_bucket)
    keep_flat = (rank < capacity) & valid
    dropped = int((valid & ~keep_flat).sum())
    keep = keep_flat.reshape(num_tokens, k)
    kept_weights = torch.where(keep, weights, torch.zeros_like(weights))
    if renormalize_after_drop:
        total = kept_weights.sum(dim=-1, keepdim=True)
        kept_weights = kept_weights / total.clamp(min=torch.finfo(total.dtype).tiny) * scaling
    kept_indices = torch.where(keep, indices, torch.full_like(indices, -1))
    if not pad_to_capacity:
        return Dropped(kept_indices, kept_weights, dropped)
    # Padded lists: the kept pairs of each (group, expert) in token order, -1 after them.
    kept_bucket = torch.where(keep_flat, bucket, padding_bucket)
    position = rank_in_bucket(kept_bucket, torch.arange(token.numel(), device=device),
                              padding_bucket)
    rows = flat_expert[keep_flat]
    columns = group[keep_flat] * capacity + position[keep_flat]
    width = num_groups * capacity
    expert_tokens = torch.full((num_experts, width), -1, dtype=torch.int64, device=device)
    expert_weights = torch.zeros(num_experts, width, dtype=kept_weights.dtype, device=device)
    expert_tokens[rows, columns] = token[keep_flat]
    expert_weights[rows, columns] = kept_weights.reshape(-1)[keep_flat]
    return Dropped(kept_indices, kept_weights, dropped, expert_tokens, expert_weights)


def drop_for_config(
    indices: torch.Tensor,
    weights: torch.Tensor,
    probs: torch.Tensor,
    config: RouterConfig,
    lead: tuple[int, ...],
    top_k: int,
) -> Dropped:
    """:func:`apply_capacity` with every rule from ``config`` (needs ``drops_tokens``).

    indices/weights: [T, k] flat selection of a call whose input had leading dims
    ``lead`` ([T] or [B, S]); probs: [T, E]; top_k: the k the capacity formula uses.
    """
    groups = capacity_groups(config.capacity_scope, lead)
    capacity = capacity_for(config, indices.shape[0] // groups if groups else 0, top_k)
    return apply_capacity(
        indices,
        weights,
        capacity,
        config.drop_policy,
        num_experts=config.num_experts,
        probs=probs,
        priority=config.capacity_priority,
        num_groups=groups,
        renormalize_after_drop=config.renormalize_after_drop,
        scaling=config.routed_scaling_factor,
        pad_to_capacity=config.pad_to_capacity,
    )
