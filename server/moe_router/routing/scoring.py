"""The row-wise steps around the gate matmul and the top-k: input norm, logit transforms,
correction bias, group masking and the combine weights of token-choice routers.

Shapes: T tokens, D hidden size, E experts (E_r of them routed, S = E - E_r shared and
scored by the gate), k experts per token, G groups. Every function works on each row
(token) alone, so routing a token together with others never changes its answer
(``RouterBase.route_many`` merges calls). Math in fp32.
"""

from __future__ import annotations

import torch

from moe_router.routing import functional as F
from moe_router.routing.router_config import GroupMaskFill, GroupScore

__all__ = [
    "rms_scaled",
    "transform_logits",
    "mask_dropped_groups",
    "combine_weights",
    "sparsemixer_top2",
]


def rms_scaled(
    x: torch.Tensor, scale: torch.Tensor, eps: float, round_to: torch.dtype | None = None
) -> torch.Tensor:
    """Gemma 4's router input: x * (mean(x^2) + eps)^-1/2 * scale * D^-1/2.

    x: [T, D] fp32; scale: [D]. As ``Gemma4RMSNorm(with_scale=False)`` followed by
    ``* self.scale * self.scalar_root_size`` (transformers ``Gemma4TextRouter``), the
    same operations in the same order (``pow(-0.5)``, not ``rsqrt``). ``round_to``:
    the dtype the input came in; the reference returns the norm in it (``type_as``)
    before scaling, so a bf16 input's norm is rounded to bf16 here too.
    """
    mean_squared = x.pow(2).mean(-1, keepdim=True) + eps
    normed = x * F.batch_invariant_elementwise(lambda m: torch.pow(m, -0.5), mean_squared)
    if round_to is not None and round_to != normed.dtype:
        normed = normed.to(round_to).float()
    return normed * scale * (x.shape[-1] ** -0.5)


def transform_logits(
    logits: torch.Tensor, multiplier: float, softcap: float | None
) -> torch.Tensor:
    """logits [T, E] * multiplier, then soft-capped: tanh(logits / c) * c.

    The multiplier is MuseSpark's ``output_multiplier``; the cap Laguna's
    ``moe_router_logit_softcapping`` (Gemma-2-style soft capping, bounded in (-c, c)).
    """
    if multiplier != 1.0:
        logits = logits * multiplier
    if softcap is not None:
        logits = F.batch_invariant_elementwise(torch.tanh, logits / softcap) * softcap
    return logits


def mask_dropped_groups(
    choice: torch.Tensor,
    n_group: int,
    topk_group: int,
    group_score: GroupScore,
    fill: GroupMaskFill,
) -> torch.Tensor:
    """Keep the experts of each token's ``topk_group`` best groups; mask the others.

    choice: [T, E] selection scores. Groups are E/G consecutive experts, scored by their
    best expert (``max``, DeepSeek-V2) or the sum of their best two (``top2_sum``, V3);
    ties go to the lower group. Experts of dropped groups get -inf (never chosen) or
    0.0 (``zero``: what transformers' DeepSeek-V2, Mistral 4 and AXK2 routers write).
    Returns [T, E].
    """
    num_tokens, num_experts = choice.shape
    grouped = choice.reshape(num_tokens, n_group, num_experts // n_group)
    if group_score is GroupScore.TOP2_SUM:
        # Only the two largest values count, largest first, not which experts hold them:
        # a plain top-k gives them (ties change nothing), without the stable sort or the
        # tie check of topk_lowest_index (measured here: [16, 8, 32] 14 against 47 us).
        group_scores = torch.topk(grouped, 2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    kept_groups = F.topk_lowest_index(group_scores, topk_group)[1]
    group_dropped = torch.ones_like(group_scores, dtype=torch.bool)
    group_dropped.scatter_(1, kept_groups, False)
    value = float("-inf") if fill is GroupMaskFill.NEG_INF else 0.0
    # The [T, G, 1] group mask broadcast over each group's experts: no [T, E] mask made.
    masked = grouped.masked_fill(group_dropped.unsqueeze(-1), value)
    return masked.view(num_tokens, num_experts)


def combine_weights(
    scores: torch.Tensor,
    indices: torch.Tensor,
    *,
    routed_experts: int,
    renormalize: bool,
    eps: float,
    chosen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine weights of the chosen experts, from the unbiased scores.

    scores: [T, E]; indices: [T, k] chosen among the first ``routed_experts`` E_r.

        w = scores[indices]                                    [T, k]
        w = w / (sum w + eps)                  if renormalize
    with S = E - E_r > 0 scored shared experts (Inkling) every token also takes the
    shared ones, and their scores join the denominator:
        w = [scores[indices], scores[E_r:]] / (sum of both + eps)   [T, k + S]
    ``chosen``: scores[indices] when the caller already has them (the top-k values of
    a selection made on the scores themselves), saving the gather.
    Returns (indices [T, k(+S)], weights [T, k(+S)]).
    """
    weights = scores.gather(1, indices) if chosen is None else chosen
    num_experts = scores.shape[1]
    if routed_experts < num_experts:
        shared = scores[:, routed_experts:]
        weights = torch.cat([weights, shared], dim=1)
        shared_ids = torch.arange(routed_experts, num_experts, device=indices.device)
        indices = torch.cat([indices, shared_ids.expand(indices.shape[0], -1)], dim=1)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + eps if eps else total)  # s + 0.0 is s: one op less
    elif chosen is not None:
        weights = weights.contiguous()  # not a view that keeps the sorted scores alive
    return indices, weights


def sparsemixer_top2(
    logits: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's inference routing (Liu et al. 2024, arXiv:2409.12136; PhiMoE).

    logits: [T, E] fp32. For the first expert, m = max logit:
        e1      = argmax(logits)
        masked  = logits where (m - x) / max(|x|, m) <= 2 * eps, else -inf
        w1      = softmax(masked)[e1]
    and the same again for the second, with e1 removed (-inf) and m its new max (the
    factor still clamps |x| of the unmasked logits). Training draws e1, e2 by Gumbel
    sampling; this is the deterministic eval path of transformers' ``sparsemixer``
    (ties: the lower index). Returns (indices [T, 2] int64, weights [T, 2]).
    """
    top1_value, top1 = logits.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top1_value)
    masked = logits.masked_fill((top1_value - logits) / factor > 2 * eps, float("-inf"))
    weight1 = torch.softmax(masked, dim=-1).gather(-1, top1)
    without_top1 = torch.scatter(logits, -1, top1, float("-inf"))
    top2_value, top2 = without_top1.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top2_value)
    masked2 = without_top1.masked_fill((top2_value - logits) / factor > 2 * eps, float("-inf"))
    weight2 = torch.softmax(masked2, dim=-1).gather(-1, top2)
    return torch.cat([top1, top2], dim=-1), torch.cat([weight1, weight2], dim=-1)

