"""ExpertChoiceRouter: experts pick tokens, answered token-centric; hand cases and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import ExpertChoiceRouter, RouterConfig, ScoringFunction


def _identity_router(num_experts: int, tokens_per_expert: int | None = None, **config):
    config.setdefault("renormalize", False)
    router = ExpertChoiceRouter(
        RouterConfig(hidden_size=num_experts, num_experts=num_experts, top_k=1, **config),
        tokens_per_expert=tokens_per_expert,
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Softmax over 2 experts of these rows: t0 [.881, .119], t1 [.119, .881],
# t2 [.731, .269], t3 [.5, .5].
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])


def test_default_capacity_gives_each_token_one_expert_here():
    # capacity = ceil(1.0 * 4 / 2) = 2: expert 0 takes t0, t2; expert 1 takes t1, t3.
    out = _identity_router(2)(LOGITS)
    assert out.expert_indices.tolist() == [[0], [1], [0], [1]]
    torch.testing.assert_close(
        out.expert_weights,
        torch.tensor([[_sigmoid(2)], [_sigmoid(2)], [_sigmoid(1)], [0.5]]),
    )
    assert out.tokens_per_expert.tolist() == [2, 2]


def test_tokens_may_get_several_experts_largest_score_first():
    # capacity 3: expert 0 takes t0 (.88), t2 (.73), t3 (.5); expert 1 takes t1, t3, t2.
    out = _identity_router(2, tokens_per_expert=3)(LOGITS)
    assert out.expert_indices.tolist() == [[0, -1], [1, -1], [0, 1], [0, 1]]
    assert out.num_experts_per_token.tolist() == [1, 1, 2, 2]
    torch.testing.assert_close(
        out.expert_weights,
        torch.tensor(
            [[_sigmoid(2), 0.0], [_sigmoid(2), 0.0], [_sigmoid(1), 1 - _sigmoid(1)], [0.5, 0.5]]
        ),
    )
    assert out.tokens_per_expert.tolist() == [3, 3]


def test_tokens_no_expert_chose_get_none():
    out = _identity_router(2, tokens_per_expert=1)(LOGITS)
    assert out.expert_indices.tolist() == [[0], [1], [-1], [-1]]
    assert out.expert_weights.tolist() == [[pytest.approx(_sigmoid(2))]] * 2 + [[0.0], [0.0]]
    assert out.num_experts_per_token.tolist() == [1, 1, 0, 0]


def test_capacity_is_clamped_to_the_number_of_tokens():
    router = _identity_router(4, tokens_per_expert=10)
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out = router(logits)
    # Every expert takes all 3 tokens: every token gets all experts, weights = softmax.
    assert out.num_experts_per_token.tolist() == [4, 4, 4]
    assert out.tokens_per_expert.tolist() == [3, 3, 3, 3]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(out.expert_weights, probs.gather(1, out.expert_indices.long()))
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(3))


@pytest.mark.parametrize(
    ("tokens", "experts", "factor", "expected"),
    [(16, 4, None, 4), (16, 4, 2.0, 8), (10, 4, 1.0, 3), (3, 8, 1.0, 1), (5, 2, 4.0, 5)],
)
def test_capacity_from_capacity_factor(tokens, experts, factor, expected):
    router = ExpertChoiceRouter(
        RouterConfig(hidden_size=8, num_experts=experts, top_k=1, capacity_factor=factor)
    )
    assert router.capacity(tokens) == expected
    out = router(torch.randn(tokens, 8, generator=torch.Generator().manual_seed(tokens)))
    assert out.tokens_per_expert.tolist() == [expected] * experts
    assert out.dropped_tokens == 0


def test_equal_scores_pick_the_earliest_tokens():
    out = _identity_router(4, tokens_per_expert=2)(torch.zeros(6, 4))
    # Every expert takes tokens 0 and 1; they get experts in index order.
    assert out.expert_indices.tolist() == [[0, 1, 2, 3]] * 2 + [[-1, -1, -1, -1]] * 4
    torch.testing.assert_close(out.expert_weights[:2], torch.full((2, 4), 0.25))


def test_renormalize_and_scaling_factor():
    router = _identity_router(2, tokens_per_expert=3, renormalize=True, routed_scaling_factor=2.0)
    out = router(LOGITS)
    torch.testing.assert_close(
        out.expert_weights,
        torch.tensor(
            [[2.0, 0.0], [2.0, 0.0], [2 * _sigmoid(1), 2 * (1 - _sigmoid(1))], [1.0, 1.0]]
        ),
    )


def test_aux_loss_is_one_and_describes_balance():
    router = ExpertChoiceRouter(RouterConfig(hidden_size=8, num_experts=4, top_k=1))
    out = router(torch.randn(12, 8, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0))
    assert router.couples_tokens and router.couples_tokens_now
    assert router.k_range == (0, 4)


def test_batched_input_is_one_group_of_tokens():
    router = ExpertChoiceRouter(RouterConfig(hidden_size=8, num_experts=4, top_k=1))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    batched = router(x)
    flat = router(x.reshape(15, 8))
    assert batched.expert_indices.shape[:2] == (3, 5)
    torch.testing.assert_close(batched.expert_indices.reshape(15, -1), flat.expert_indices)
    torch.testing.assert_close(batched.expert_weights.reshape(15, -1), flat.expert_weights)


def test_empty_call():
    router = ExpertChoiceRouter(RouterConfig(hidden_size=8, num_experts=4, top_k=1))
    out = router(torch.zeros(0, 8))
    assert out.expert_indices.shape == (0, 1)
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_rejects_bad_tokens_per_expert(bad):
    with pytest.raises(RouterConfigurationError, match="tokens_per_expert"):
        ExpertChoiceRouter(RouterConfig(hidden_size=8, num_experts=4), tokens_per_expert=bad)


def test_rejects_sigmoid_scoring():
    config = RouterConfig(hidden_size=8, num_experts=4, scoring=ScoringFunction.SIGMOID)
    with pytest.raises(RouterConfigurationError, match="scoring"):
        ExpertChoiceRouter(config)
