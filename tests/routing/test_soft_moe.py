"""SoftMoERouter: dispatch/combine softmaxes by hand, per-sequence dispatch, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import RouterConfig, SoftMoERouter


def _router(num_experts=4, hidden=8, slots=1, temperature=1.0, seed=0, **config) -> SoftMoERouter:
    torch.manual_seed(seed)
    return SoftMoERouter(
        RouterConfig(hidden_size=hidden, num_experts=num_experts, **config),
        temperature=temperature,
        slots_per_expert=slots,
    )


def test_gate_is_phi_with_one_row_per_slot():
    router = _router(num_experts=4, hidden=8, slots=3)
    assert router.gate.weight.shape == (12, 8)
    assert router.gate.bias is None


def test_dispatch_and_combine_by_hand():
    router = _router(num_experts=2, hidden=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    out = router(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    s = 1.0 / (1.0 + math.exp(-1.0))  # softmax([1, 0]) = [s, 1 - s]
    # combine: softmax over the slots of each token (rows)
    torch.testing.assert_close(out.combine_weights, torch.tensor([[s, 1 - s], [0.5, 0.5]]))
    # dispatch: softmax over the tokens of each slot (columns)
    torch.testing.assert_close(out.dispatch_weights, torch.tensor([[s, 0.5], [1 - s, 0.5]]))
    assert out.expert_indices.tolist() == [[0, 1], [0, 1]]
    torch.testing.assert_close(out.expert_weights, out.combine_weights)
    assert out.num_experts_per_token.tolist() == [2, 2]


def test_expert_weight_is_the_sum_of_its_slots():
    router = _router(num_experts=3, slots=2)
    out = router(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)))
    assert out.combine_weights.shape == (5, 6) and out.dispatch_weights.shape == (5, 6)
    torch.testing.assert_close(out.expert_weights, out.combine_weights.reshape(5, 3, 2).sum(-1))
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(out.dispatch_weights.sum(0), torch.ones(6))
    assert out.router_logits.shape == (5, 6)


def test_temperature_divides_the_logits():
    hot = _router(temperature=2.0, seed=3)
    cold = _router(temperature=1.0, seed=3)
    with torch.no_grad():
        cold.gate.weight.copy_(hot.gate.weight / 2)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    a, b = hot(x), cold(x)
    torch.testing.assert_close(a.combine_weights, b.combine_weights)
    torch.testing.assert_close(a.dispatch_weights, b.dispatch_weights)
    # router_logits are the raw phi logits, before the temperature
    torch.testing.assert_close(a.router_logits, 2 * b.router_logits)


def test_dispatch_is_per_sequence_for_batched_input():
    router = _router(num_experts=2, slots=2)
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(4))
    batched = router(x)
    dispatch = batched.dispatch_weights.reshape(3, 4, 4)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(3, 4))
    for b in range(3):
        alone = router(x[b])
        torch.testing.assert_close(dispatch[b], alone.dispatch_weights)
    # Combine weights are per token: the same as routing the flat tokens.
    flat = router(x.reshape(12, 8))
    torch.testing.assert_close(batched.combine_weights, flat.combine_weights)
    torch.testing.assert_close(batched.expert_weights.reshape(12, 2), flat.expert_weights)
    assert not torch.allclose(batched.dispatch_weights, flat.dispatch_weights)


def test_gradients_flow_to_phi():
    router = _router(num_experts=3, slots=2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    out = router(x)
    slots = out.dispatch_weights.t() @ x  # [E*S, D] slot inputs
    y = out.combine_weights @ slots  # [T, D]
    (y.square().sum() + out.expert_weights[:, 0].sum()).backward()
    grad = router.gate.weight.grad
    assert grad is not None and grad.shape == (6, 8)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_losses_counts_and_scaling():
    router = _router(num_experts=4, routed_scaling_factor=2.0)
    out = router(torch.randn(7, 8, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0))
    assert out.tokens_per_expert.tolist() == [7, 7, 7, 7]
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.full((7,), 2.0))
    assert router.k_range == (4, 4) and router.couples_tokens


def test_empty_call():
    out = _router()(torch.zeros(0, 8))
    assert out.expert_indices.shape == (0, 4)
    assert out.dispatch_weights.shape == (0, 4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_rejects_bad_temperature(bad):
    with pytest.raises(RouterConfigurationError, match="temperature"):
        SoftMoERouter(RouterConfig(hidden_size=8, num_experts=4), temperature=bad)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_rejects_bad_slots_per_expert(bad):
    with pytest.raises(RouterConfigurationError, match="slots_per_expert"):
        SoftMoERouter(RouterConfig(hidden_size=8, num_experts=4), slots_per_expert=bad)
