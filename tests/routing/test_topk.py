"""TopKRouter through the shared RouterBase pipeline, on hand-calculated cases."""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.routing import RouterConfig, ScoringFunction, TopKRouter
from moe_router.routing import functional as F


def _identity_router(num_experts: int, **config) -> TopKRouter:
    """A router whose gate is the identity, so the hidden state IS the logits."""
    router = TopKRouter(RouterConfig(hidden_size=num_experts, num_experts=num_experts, **config))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_softmax_top2_renormalized_by_hand():
    router = _identity_router(4, top_k=2)
    out = router(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert out.expert_indices.tolist() == [[3, 2]]
    # softmax restricted to {4, 3} and renormalised = (sigma(1), 1 - sigma(1))
    expected = torch.tensor([[_sigmoid(1.0), 1 - _sigmoid(1.0)]])
    torch.testing.assert_close(out.expert_weights, expected)
    assert out.num_experts_per_token.tolist() == [2]
    assert out.expert_indices.dtype == torch.int32 and out.expert_weights.dtype == torch.float32


def test_softmax_without_renormalize_keeps_the_probabilities():
    router = _identity_router(4, top_k=2, renormalize=False)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = router(logits)
    expected = torch.softmax(logits, -1)[:, [3, 2]]
    torch.testing.assert_close(out.expert_weights, expected)


def test_sigmoid_scoring_and_scaling_factor_by_hand():
    router = _identity_router(
        4, top_k=2, scoring=ScoringFunction.SIGMOID, renormalize=False, routed_scaling_factor=2.5
    )
    out = router(torch.tensor([[0.0, -1.0, 2.0, 1.0]]))
    assert out.expert_indices.tolist() == [[2, 3]]
    torch.testing.assert_close(
        out.expert_weights, torch.tensor([[2.5 * _sigmoid(2.0), 2.5 * _sigmoid(1.0)]])
    )


def test_sigmoid_aux_loss_uses_scores_normalised_per_token():
    router = _identity_router(4, top_k=1, scoring=ScoringFunction.SIGMOID)
    logits = torch.tensor([[0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    out = router(logits)
    probs = F.renormalize(torch.sigmoid(logits))
    expected = F.compute_aux_loss(probs, torch.tensor([[3], [0]]), 1)
    torch.testing.assert_close(out.aux_loss, expected)


def test_equal_logits_choose_the_lowest_experts():
    router = _identity_router(8, top_k=3)
    out = router(torch.zeros(5, 8))
    assert out.expert_indices.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(out.expert_weights, torch.full((5, 3), 1 / 3))


def test_router_logits_and_z_loss_are_reported():
    router = _identity_router(4, top_k=2)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    out = router(logits)
    torch.testing.assert_close(out.router_logits, logits)
    # logsumexp: ln 4 and ln 6
    torch.testing.assert_close(
        out.z_loss, torch.tensor((math.log(4.0) ** 2 + math.log(6.0) ** 2) / 2)
    )


def test_capacity_factor_drops_over_capacity_assignments():
    # 4 tokens, all prefer expert 0 (k=1, E=2): capacity ceil(4*1/2*1.0) = 2.
    # Without renormalisation the final weight is the softmax probability, so the
    # "probs" policy keeps the two most confident tokens (1 and 3).
    router = _identity_router(2, top_k=1, capacity_factor=1.0, renormalize=False)
    out = router(torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]]))
    assert out.expert_indices.flatten().tolist() == [-1, 0, -1, 0]
    assert out.num_experts_per_token.tolist() == [0, 1, 0, 1]
    assert out.expert_weights.flatten().tolist() == pytest.approx(
        [0.0, _sigmoid(3.0), 0.0, _sigmoid(4.0)]
    )
    assert out.dropped_tokens == 2
    assert out.tokens_per_expert.tolist() == [2, 0]
    assert router.couples_tokens_now


def test_capacity_position_policy_keeps_earliest_tokens():
    router = _identity_router(2, top_k=1, capacity_factor=1.0, drop_policy="position")
    out = router(torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]]))
    assert out.expert_indices.flatten().tolist() == [0, 0, -1, -1]


def test_running_statistics_accumulate_and_reset():
    router = _identity_router(4, top_k=1)
    router(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    router(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    stats = router.get_stats()
    assert stats["total_batches"] == 2
    assert stats["total_tokens"] == 3
    assert stats["tokens_per_expert"] == [2, 1, 0, 0]
    assert stats["most_used_expert"] == 0
    assert stats["avg_experts_per_token"] == 1.0
    assert stats["load_balance_score"] == pytest.approx(9 / (4 * 5))
    router.reset_stats()
    assert router.get_stats()["tokens_per_expert"] == [0, 0, 0, 0]


def test_jitter_is_train_only_and_reproducible_with_a_generator():
    router = TopKRouter(RouterConfig(hidden_size=16, num_experts=8, top_k=2, jitter_noise=0.5))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    router.train()
    assert router.stochastic
    first = router(x, generator=torch.Generator().manual_seed(5))
    again = router(x, generator=torch.Generator().manual_seed(5))
    other = router(x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first.router_logits, again.router_logits, rtol=0, atol=0)
    assert not torch.equal(first.router_logits, other.router_logits)
    router.eval()
    assert not router.stochastic
    clean = router(x, generator=torch.Generator().manual_seed(5))
    expected = x @ router.gate.weight.t()
    torch.testing.assert_close(clean.router_logits, expected, rtol=1e-5, atol=1e-5)


def test_k_range_and_couples_tokens():
    router = TopKRouter(RouterConfig(hidden_size=4, num_experts=8, top_k=3))
    assert router.k_range == (3, 3)
    assert not router.couples_tokens and not router.couples_tokens_now


def test_empty_batch_routes_to_empty_answer():
    router = TopKRouter(RouterConfig(hidden_size=4, num_experts=8, top_k=2))
    out = router(torch.zeros(0, 4))
    assert out.expert_indices.shape == (0, 2)
    assert out.tokens_per_expert.tolist() == [0] * 8
    assert float(out.aux_loss) == 0.0


def test_losses_are_computed_in_training_or_when_asked_and_never_change_the_answer():
    router = TopKRouter(RouterConfig(num_experts=8, top_k=2, hidden_size=16,
                                     scoring=ScoringFunction.SIGMOID))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    trained = router(x)  # an nn.Module starts in training mode: losses by default
    assert trained.aux_loss is not None and trained.z_loss is not None
    router.eval()
    lean, asked = router(x), router(x, return_losses=True)
    assert lean.aux_loss is None and lean.z_loss is None
    torch.testing.assert_close(asked.aux_loss, trained.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(asked.z_loss, trained.z_loss, rtol=0, atol=0)
    for field in ("expert_indices", "expert_weights", "tokens_per_expert", "router_logits"):
        assert torch.equal(getattr(lean, field), getattr(asked, field))
    # Merged calls: one flag per call.
    first, second = router.route_many([x, x[:2]], return_losses=[True, False])
    torch.testing.assert_close(first.aux_loss, asked.aux_loss, rtol=0, atol=0)
    assert second.aux_loss is None


@pytest.mark.parametrize("experts,top_k", [(2, 1), (8, 2), (60, 4), (256, 8)])
def test_skipping_a_vanishing_renormalize_eps_changes_no_bit(experts: int, top_k: int) -> None:
    """Softmax top-k: s + 1e-20 rounds to s for every sum of chosen scores, so the
    router leaves the addition out; answers match the eps-adding computation exactly."""
    torch.manual_seed(experts)
    router = TopKRouter(RouterConfig(hidden_size=32, num_experts=experts, top_k=top_k,
                                     renormalize=True, renormalize_eps=1e-20)).eval()
    assert router._eps_vanishes
    x = torch.cat([torch.randn(500, 32), torch.randn(500, 32) * 300.0])  # flat and peaked
    with torch.inference_mode():
        skipped = router(x).expert_weights
        router._eps_vanishes = False
        added = router(x).expert_weights
    assert torch.equal(skipped, added)


def test_a_large_renormalize_eps_is_still_added() -> None:
    router = TopKRouter(RouterConfig(hidden_size=8, num_experts=8, top_k=2, renormalize=True,
                                     renormalize_eps=1e-3))
    assert not router._eps_vanishes
