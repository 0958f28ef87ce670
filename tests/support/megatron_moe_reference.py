"""A port, for tests only, of the Megatron-core 0.19.2 routing functions we compare with.

megatron-core itself cannot be a dependency of this project: version 0.19.2 declares
Requires-Python >= 3.12 (our floor is 3.10) and ``import megatron.core`` imports
``triton`` (about 1 GB installed) through ``megatron/core/transformer/moe/paged_stash.py``.
Where it is installed (``pip install --ignore-requires-python megatron-core==0.19.2
triton``), ``tests/routing/test_megatron_parity.py`` checks these functions against it
on random inputs; everywhere the routers are checked against these functions.

Each function keeps its Megatron name and arguments (``megatron/core/transformer/moe/
moe_utils.py``), only the non-fused, single-rank path (no Transformer Engine, no router
replay, no padding mask, no process groups), in fp32.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MEGATRON_CORE_VERSION",
    "get_capacity",
    "group_limited_topk",
    "topk_routing_with_score_function",
    "compute_routing_scores_for_aux_loss",
    "apply_router_token_dropping",
    "switch_load_balancing_loss_func",
]

MEGATRON_CORE_VERSION = "0.19.2"


def get_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(num_tokens / num_experts * capacity_factor); callers pass T * topk tokens."""
    return math.ceil((num_tokens / num_experts) * capacity_factor)


def group_limited_topk(
    scores: torch.Tensor, topk: int, num_tokens: int, num_experts: int, num_groups: int,
    group_topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups scored by the sum of their top (topk // group_topk) scores; the best
    group_topk groups kept, the others' experts masked with -inf; then top-k."""
    per_group = scores.view(num_tokens, num_groups, -1)
    group_scores = per_group.topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    kept = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, kept, 1)
    expert_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(num_tokens, -1)
    masked = scores.masked_fill(~expert_mask.bool(), float("-inf"))
    return torch.topk(masked, k=topk, dim=-1)


def topk_routing_with_score_function(
    logits: torch.Tensor,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: str = "softmax",
    expert_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_probs [T, E], routing_map [T, E] bool): the top-k selection and its final
    weights. softmax: pre-softmax (softmax, then top-k) or post (top-k of the logits,
    then softmax over the k); sigmoid: top-k of sigmoid (+ expert_bias for selection
    only), weights normalised over the k when topk > 1; then times scaling_factor."""
    num_tokens, num_experts = logits.shape

    def compute_topk(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if group_topk:
            assert num_groups is not None
            return group_limited_topk(scores, topk, num_tokens, num_experts, num_groups,
                                      group_topk)
        return torch.topk(scores, k=topk, dim=1)

    if score_function == "softmax":
        if use_pre_softmax:
            probs, top_indices = compute_topk(torch.softmax(logits, dim=-1, dtype=torch.float32))
        else:
            top_logits, top_indices = compute_topk(logits)
            probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
        if expert_bias is not None:
            top_indices = compute_topk(scores + expert_bias.float())[1]
            scores = torch.gather(scores, dim=1, index=top_indices)
        else:
            scores, top_indices = compute_topk(scores)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    else:
        raise ValueError(f"score_function {score_function!r} is not ported")
    if scaling_factor:
        probs = probs * scaling_factor
    probs = probs.type_as(logits)
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


def compute_routing_scores_for_aux_loss(
    logits: torch.Tensor, topk: int, score_function: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_map [T, E], scores [T, E]) the aux loss uses: softmax over all experts,
    or sigmoid normalised over all experts; the map is their plain top-k (no groups,
    no bias)."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"score_function {score_function!r} is not ported")
    top_indices = torch.topk(scores, k=topk, dim=1)[1]
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    return routing_map, scores


def apply_router_token_dropping(
    routing_probs: torch.Tensor,
    routing_map: torch.Tensor,
    router_topk: int,
    capacity_factor: float,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final_probs, final_map) [T, E]: each expert keeps its top-C column entries of the
    final routing probs ("probs") or of the routing map ("position"), C = get_capacity(
    T * topk, E, factor); no dropping when C > T. pad_to_capacity keeps the C chosen
    rows of every column, routed or not (weight 0 where not)."""
    num_tokens, num_experts = routing_probs.shape
    capacity = get_capacity(num_tokens * router_topk, num_experts, capacity_factor)
    if capacity > num_tokens:
        capacity_mask = torch.ones_like(routing_probs).bool()
    else:
        if drop_policy == "probs":
            ranked = routing_probs
        elif drop_policy == "position":
            ranked = routing_map.int()
        else:
            raise ValueError(f"Invalid drop_policy: {drop_policy}")
        chosen = torch.topk(ranked, k=capacity, dim=0, sorted=False)[1]
        capacity_mask = torch.zeros_like(routing_probs).scatter(0, chosen, 1).bool()
    final_map = capacity_mask if pad_to_capacity else torch.logical_and(routing_map,
                                                                         capacity_mask)
    return routing_probs * final_map, final_map


def switch_load_balancing_loss_func(
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    total_num_tokens: int,
    topk: int,
    num_experts: int,
    moe_aux_loss_coeff: float,
) -> torch.Tensor:
    """E * coeff / (topk * T^2) * sum_i (sum_t probs[t, i]) * tokens_per_expert[i]
    (= E * sum_i f_i * P_i with f_i = count_i / (T * topk), P_i = mean_t probs[t, i])."""
    aggregated = probs.sum(dim=0)
    return torch.sum(aggregated * tokens_per_expert) * (
        num_experts * moe_aux_loss_coeff / (topk * total_num_tokens * total_num_tokens)
    )
