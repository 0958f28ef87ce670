"""Grouped expert execution: run each expert once on all of its tokens, then scatter-add back.

The (token, slot) assignments are flattened, sorted by expert, split into one
contiguous group per expert, and each expert that has tokens is called once on its
group; the weighted results are summed into the output with ``index_add_``. There is
no Python loop over tokens; the loop runs over experts that received tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_router.errors import ExpertDispatchError

__all__ = ["run_experts_grouped"]


def run_experts_grouped(
    hidden_states: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    experts: nn.ModuleList | Sequence[nn.Module],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the chosen experts' outputs for every token.

    hidden_states:  [T, D]  flat tokens.
    expert_indices: [T, k]  expert ids, -1 for an unused slot (variable k per token).
    expert_weights: [T, k]  combine weights (ignored where the index is -1).
    experts:        E modules mapping [N, D] -> [N, D].

    Returns ``(output [T, D] in hidden_states.dtype, tokens_per_expert [E] int64)``;
    a token with no real slot gets a zero row. Differentiable in the weights, the
    experts' parameters and the hidden states.
    """
    num_tokens, k = expert_indices.shape
    num_experts = len(experts)
    if expert_weights.shape != expert_indices.shape:
        raise ExpertDispatchError(
            f"expert_weights shape {list(expert_weights.shape)} does not match "
            f"expert_indices shape {list(expert_indices.shape)}"
        )
    if hidden_states.shape[0] != num_tokens:
        raise ExpertDispatchError(
            f"expert_indices has {num_tokens} rows for {hidden_states.shape[0]} tokens"
        )
    flat_expert = expert_indices.reshape(-1).long()
    # Padding (-1) becomes group E, sorted last and never run; an out-of-range index
    # x >= E becomes group x + 1, which makes the bincount longer than E + 1.
    group = torch.where(flat_expert >= 0, flat_expert, num_experts)
    group = torch.where(flat_expert >= num_experts, flat_expert + 1, group)
    order = torch.argsort(group, stable=True)  # group by expert, token order inside
    sizes = torch.bincount(group, minlength=num_experts + 1).tolist()  # the one host sync
    if len(sizes) > num_experts + 1:
        raise ExpertDispatchError(
            f"expert index {len(sizes) - 2} out of range for {num_experts} experts"
        )
    counts = torch.tensor(sizes[:num_experts], dtype=torch.int64, device=flat_expert.device)
    token_of_slot = torch.div(order, k, rounding_mode="floor")
    weight_of_slot = expert_weights.reshape(-1)[order]

    output = torch.zeros_like(hidden_states)
    token_groups = torch.split(token_of_slot, sizes)
    weight_groups = torch.split(weight_of_slot, sizes)
    for expert_id, size in enumerate(sizes[:num_experts]):
        if size == 0:
            continue
        tokens = token_groups[expert_id]
        result = experts[expert_id](hidden_states[tokens])
        weighted = result * weight_groups[expert_id].unsqueeze(1).to(result.dtype)
        output.index_add_(0, tokens, weighted.to(output.dtype))
    return output, counts
