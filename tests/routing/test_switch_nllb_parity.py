"""Switch Transformers' and NLLB-MoE's capacity rules against transformers' own routers.

Tiny random configs with the models' own rules: Switch (top-1, an absolute
``expert_capacity`` per sequence, earliest tokens first) and NLLB-MoE (top-2 over the
whole call, slot-major priority, batch prioritized routing or token order, weights
normalised before or after dropping). The same gate weights route the same inputs
through both; kept (token, expert) pairs must be identical and weights within 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from transformers import NllbMoeConfig, SwitchTransformersConfig
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
)

from moe_router.routing import RouterConfig, TopKRouter


def _ours(gate: torch.Tensor, **config) -> TopKRouter:
    num_experts, hidden = gate.shape
    router = TopKRouter(RouterConfig(hidden_size=hidden, num_experts=num_experts, **config))
    with torch.no_grad():
        router.gate.weight.copy_(gate)
    return router.eval()


def _dense(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Combine weights [T, E] from a token-centric answer (-1 padding dropped)."""
    indices = indices.reshape(-1, indices.shape[-1]).long()
    weights = weights.reshape(indices.shape)
    column = torch.where(indices >= 0, indices, num_experts)
    dense = torch.zeros(indices.shape[0], num_experts + 1).scatter(1, column, weights)
    return dense[:, :num_experts]


@pytest.mark.parametrize(
    ("experts", "batch", "seq", "capacity"),
    [(8, 3, 32, 4), (16, 2, 24, 2), (4, 4, 10, 3)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_switch_top1_router_capacity_per_sequence(experts, batch, seq, capacity, seed):
    hidden = 24
    config = SwitchTransformersConfig(d_model=hidden, num_experts=experts,
                                      expert_capacity=capacity, router_jitter_noise=0.0)
    reference = SwitchTransformersTop1Router(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference.classifier.weight.copy_(torch.randn(experts, hidden, generator=gen))
    x = torch.randn(batch, seq, hidden, generator=gen)
    ours = _ours(reference.classifier.weight.detach(), top_k=1, renormalize=False,
                 expert_capacity=capacity, capacity_scope="sequence", drop_policy="position")
    with torch.no_grad():
        expert_index, router_probs, _ = reference(x)
        out = ours(x)
    kept = expert_index.sum(-1) == 1  # [B, S]
    assert (~kept).any(), "the case must drop"
    assert torch.equal(out.expert_indices[..., 0] >= 0, kept)
    assert torch.equal(out.expert_indices[..., 0][kept].long(), expert_index.argmax(-1)[kept])
    torch.testing.assert_close(out.expert_weights[..., 0][kept], router_probs[..., 0][kept],
                               rtol=0, atol=1e-6)
    assert out.dropped_tokens == int((~kept).sum())
    # Every sequence keeps at most `capacity` tokens per expert.
    assert int(expert_index.sum(dim=1).max()) <= capacity


@pytest.mark.parametrize("normalize_before_dropping", [True, False])
@pytest.mark.parametrize("batch_prioritized", [True, False])
@pytest.mark.parametrize(("experts", "tokens", "capacity"), [(8, 40, 6), (16, 64, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nllb_top2_router_slot_major_capacity(
    normalize_before_dropping, batch_prioritized, experts, tokens, capacity, seed
):
    hidden = 24
    config = NllbMoeConfig(
        d_model=hidden, num_experts=experts, expert_capacity=capacity,
        second_expert_policy="all", batch_prioritized_routing=batch_prioritized,
        normalize_router_prob_before_dropping=normalize_before_dropping,
        moe_eval_capacity_token_fraction=-1.0,  # use expert_capacity in eval mode too
    )
    reference = NllbMoeTop2Router(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference.classifier.weight.copy_(torch.randn(experts, hidden, generator=gen))
    x = torch.randn(tokens, hidden, generator=gen)
    ours = _ours(
        reference.classifier.weight.detach(), top_k=2, renormalize=True,
        expert_capacity=capacity, capacity_priority="slot",
        drop_policy="probs" if batch_prioritized else "position",
        renormalize_after_drop=not normalize_before_dropping,
    )
    with torch.no_grad():
        _, combine, _ = reference(x)
        out = ours(x)
    dense = _dense(out.expert_indices, out.expert_weights, experts)
    assert torch.equal(dense > 0, combine > 0)  # the same kept (token, expert) pairs
    torch.testing.assert_close(dense, combine.float(), rtol=0, atol=1e-6)
    assert out.dropped_tokens == 2 * tokens - int((combine > 0).sum()) > 0
