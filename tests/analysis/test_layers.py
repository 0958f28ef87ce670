"""MoELayer family: outputs against a naive per-token loop, capacity, residuals, training."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe_router.errors import ExpertDispatchError, RouterConfigurationError, ValidationError
from moe_router.layers import (
    FeedForwardExpert,
    LayerNormMoE,
    MoELayer,
    SparseMoELayer,
    run_experts_grouped,
)
from moe_router.routing import RouterConfig, TopKRouter
from moe_router.routing.dynamic import DynamicRouter

SUMMARY_KEYS = {
    "total_forward_calls",
    "total_expert_calls",
    "avg_experts_per_forward",
    "computational_efficiency",
    "router_stats",
}


def make_router(dim: int = 8, experts: int = 4, k: int = 2, **config) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(RouterConfig(hidden_size=dim, num_experts=experts, top_k=k, **config))


def make_layer(cls=MoELayer, dim: int = 8, experts: int = 4, k: int = 2, router_config=None,
               **kwargs):
    router = make_router(dim, experts, k, **(router_config or {}))
    torch.manual_seed(1)
    return cls(router=router, expert_fn=functools.partial(FeedForwardExpert, dim, 2 * dim),
               num_experts=experts, **kwargs)


def naive_moe(x_flat, indices, weights, experts):
    """Per-token, per-slot reference: out[t] = sum_j w[t, j] * expert_{e[t, j]}(x[t])."""
    rows = []
    for t in range(x_flat.shape[0]):
        acc = torch.zeros_like(x_flat[t])
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            if e >= 0:
                acc = acc + weights[t, j] * experts[e](x_flat[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


def test_matches_naive_loop_with_independent_topk():
    layer = make_layer()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, info = layer(x, return_router_logits=True)
        flat = x.reshape(-1, 8)
        probs = torch.softmax(flat @ layer.router.gate.weight.T, dim=-1)
        top_w, top_i = probs.topk(2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        expected = naive_moe(flat, top_i, top_w, layer.experts).reshape(2, 3, 8)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(info["expert_indices"].reshape(-1, 2).long(), top_i)
    assert info["num_tokens"] == 6 and info["num_assignments"] == 12
    assert int(info["tokens_per_expert"].sum()) == 12


def test_variable_k_from_router_capacity_matches_naive_loop():
    # capacity ceil(12*2/4*0.5) = 3 per expert: the router drops, so k varies per token.
    layer = make_layer(router_config={"capacity_factor": 0.5})
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, info = layer(x, return_router_logits=True)
        expected = naive_moe(x, info["expert_indices"], info["expert_weights"], layer.experts)
    per_token = info["num_experts_per_token"]
    assert per_token.min() < per_token.max()  # really variable k
    assert info["dropped_tokens"] > 0
    torch.testing.assert_close(out, expected)
    # A token the router left with no expert gets a zero row from the plain layer.
    empty = per_token == 0
    torch.testing.assert_close(out[empty], torch.zeros_like(out[empty]))


def test_each_expert_called_once_per_forward():
    layer = make_layer(experts=4, k=2)
    calls = [0] * 4
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.__setitem__(e, calls[e] + 1))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, info = layer(x, return_router_logits=True)
    active = (info["tokens_per_expert"] > 0).tolist()
    assert calls == [1 if a else 0 for a in active]
    assert layer.get_performance_summary()["total_expert_calls"] == sum(active)


def test_run_experts_grouped_padding_anywhere_and_empty_rows():
    experts = [nn.Linear(3, 3) for _ in range(3)]
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    indices = torch.tensor([[-1, 2], [0, -1], [-1, -1], [1, 0]])
    weights = torch.tensor([[0.9, 0.4], [1.0, 0.3], [0.5, 0.5], [0.25, 0.75]])
    with torch.no_grad():
        out, counts = run_experts_grouped(x, indices, weights, experts)
        expected = naive_moe(x, indices, weights, experts)
    torch.testing.assert_close(out, expected)
    assert counts.tolist() == [2, 1, 1]
    torch.testing.assert_close(out[2], torch.zeros(3))


def test_performance_summary_keys_and_values():
    layer = make_layer(router_config={"capacity_factor": 0.5})
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(6))
    assignments = 0
    with torch.no_grad():
        for _ in range(2):
            _, info = layer(x, return_router_logits=True)
            assignments += info["num_assignments"]
    summary = layer.get_performance_summary()
    assert set(summary) == SUMMARY_KEYS
    assert summary["total_forward_calls"] == 2
    assert summary["computational_efficiency"] == pytest.approx(assignments / (2 * 12 * 2))
    assert summary["computational_efficiency"] < 1.0
    assert summary["avg_experts_per_forward"] == summary["total_expert_calls"] / 2
    assert summary["router_stats"]["total_batches"] == 2
    layer.reset_performance_stats()
    assert layer.get_performance_summary()["total_forward_calls"] == 0


def test_static_topk_efficiency_is_one():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(5, 8))
    assert layer.get_performance_summary()["computational_efficiency"] == 1.0


def test_use_bias_forwarded_only_when_named():
    router = make_router()
    with_kw = MoELayer(router, lambda use_bias: nn.Linear(8, 8, bias=use_bias), 4,
                       use_bias=False)
    assert all(e.bias is None for e in with_kw.experts)
    without_kw = MoELayer(router, lambda: nn.Linear(8, 8), 4, use_bias=False)
    assert all(e.bias is not None for e in without_kw.experts)
    partial = MoELayer(router, functools.partial(FeedForwardExpert, 8, 4), 4, use_bias=False)
    assert partial.experts[0].up.bias is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_experts": 5}, "num_experts"),
        ({"expert_capacity_factor": 0.0}, "expert_capacity_factor"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"expert_fn": lambda: "not a module"}, "expert_fn"),
        ({"router": nn.Linear(8, 4)}, "router"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, name):
    args = {"router": make_router(), "expert_fn": lambda: nn.Linear(8, 8), "num_experts": 4}
    args.update(kwargs)
    with pytest.raises(RouterConfigurationError, match=name):
        MoELayer(**args)


def test_bad_input_raises_validation_error():
    layer = make_layer()
    with pytest.raises(ValidationError, match="shape"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValidationError, match="dtype"):
        layer(torch.ones(3, 8, dtype=torch.int64))


def controlled_router(num_experts: int = 4, k: int = 1) -> TopKRouter:
    """Gate = 10 * identity: a token s * e_i strongly prefers expert i, more so for larger s."""
    router = TopKRouter(RouterConfig(hidden_size=num_experts, num_experts=num_experts,
                                     top_k=k, renormalize=False))
    with torch.no_grad():
        router.gate.weight.copy_(10.0 * torch.eye(num_experts))
    return router


def test_sparse_layer_hand_case_keeps_highest_weight_and_passes_dropped_through():
    # 4 tokens all prefer expert 0; capacity = ceil(4 * 1 / 4 * 1.0) = 1: only the token
    # with the largest weight (strength 3, token 1) is kept, the rest pass through.
    torch.manual_seed(7)
    layer = SparseMoELayer(capacity_factor=1.0, router=controlled_router(), num_experts=4,
                           expert_fn=lambda: nn.Linear(4, 4))
    strengths = torch.tensor([1.0, 3.0, 2.0, 0.5])
    x = strengths[:, None] * torch.eye(4)[0]
    with torch.no_grad():
        out, info = layer(x, return_router_logits=True)
        w1 = torch.softmax(torch.tensor([30.0, 0, 0, 0]), 0)[0]
        expected_1 = w1 * layer.experts[0](x[1:2])[0]
    assert info["expert_capacity"] == 1
    assert info["capacity_dropped"] == 3
    assert info["expert_indices"].reshape(-1).tolist() == [-1, 0, -1, -1]
    torch.testing.assert_close(out[[0, 2, 3]], x[[0, 2, 3]])
    torch.testing.assert_close(out[1], expected_1)
    assert layer.get_capacity_stats() == {"dropped_assignments": 3, "fully_dropped_tokens": 3}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cf=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
       tokens=st.integers(1, 24))
def test_sparse_capacity_properties(seed, cf, tokens):
    layer = make_layer(SparseMoELayer, capacity_factor=cf)
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out, info = layer(x, return_router_logits=True)
        _, full = make_layer()(x, return_router_logits=True)
    kept = info["expert_indices"]
    cap = info["expert_capacity"]
    assert cap == math.ceil(tokens * 2 / 4 * cf)
    assert int(info["tokens_per_expert"].max()) <= cap
    assert info["capacity_dropped"] == 2 * tokens - int((kept >= 0).sum())
    # Every dropped assignment weighs no more than any kept one of the same expert.
    for e in range(4):
        was = full["expert_indices"] == e
        now = kept == e
        dropped_w = full["expert_weights"][was & ~now]
        kept_w = info["expert_weights"][now]
        if dropped_w.numel() and kept_w.numel():
            assert float(dropped_w.max()) <= float(kept_w.min())
    none_left = (kept < 0).all(dim=-1)
    torch.testing.assert_close(out[none_left], x[none_left])


def test_sparse_layer_rejects_expert_capacity_factor():
    with pytest.raises(RouterConfigurationError, match="capacity_factor"):
        SparseMoELayer(router=make_router(), expert_fn=lambda: nn.Linear(8, 8), num_experts=4,
                       expert_capacity_factor=2.0)


def test_layernorm_moe_is_residual_over_normalised_input():
    layer = make_layer(LayerNormMoE, layer_norm_eps=1e-6)
    x = 3.0 + 2.0 * torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out, info = layer(x, return_router_logits=True)
        normed = torch.nn.functional.layer_norm(x, (8,), eps=1e-6).reshape(-1, 8)
        probs = torch.softmax(normed @ layer.router.gate.weight.T, dim=-1)
        top_w, top_i = probs.topk(2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        expected = x + naive_moe(normed, top_i, top_w, layer.experts).reshape(2, 4, 8)
    assert layer.norm.eps == 1e-6
    torch.testing.assert_close(out, expected)


def test_dropout_only_in_training():
    layer = make_layer(dropout_rate=0.5)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))
    layer.eval()
    with torch.no_grad():
        a, b = layer(x), layer(x)
        layer.train()
        torch.manual_seed(0)
        c = layer(x)
    torch.testing.assert_close(a, b)
    assert (c == 0).float().mean() > 0.2  # about half the elements zeroed


@pytest.mark.parametrize("cls", [MoELayer, LayerNormMoE])
def test_training_lowers_loss_and_router_gets_gradients(cls):
    torch.manual_seed(10)
    layer = make_layer(cls, dim=8, experts=4, k=2)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 8, generator=gen)
    target = torch.tanh(x @ torch.randn(8, 8, generator=gen))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for step in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        if step == 0:
            gate_grad = layer.router.gate.weight.grad
            assert gate_grad is not None and float(gate_grad.abs().sum()) > 0
            assert all(p.grad is not None for p in layer.experts.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_layers_exports_are_the_intended_names():
    import moe_router.layers as layers

    assert sorted(layers.__all__) == ["FeedForwardExpert", "LayerNormMoE", "MoELayer",
                                      "SparseMoELayer", "run_experts_grouped"]


def dynamic_layer(cls=MoELayer, **kwargs):
    torch.manual_seed(12)
    router = DynamicRouter(input_dim=8, num_experts=6, min_experts=1, max_experts=4)
    return cls(router=router, expert_fn=functools.partial(FeedForwardExpert, 8, 16),
               num_experts=6, **kwargs)


def test_dynamic_router_variable_k_matches_naive_loop():
    layer = dynamic_layer()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        out, info = layer(x, return_router_logits=True)
        flat = x.reshape(-1, 8)
        expected = naive_moe(flat, info["expert_indices"].reshape(15, -1),
                             info["expert_weights"].reshape(15, -1), layer.experts)
    per_token = info["num_experts_per_token"]
    assert per_token.shape == (3, 5) and info["complexity_scores"].shape == (3, 5)
    assert int(per_token.min()) >= 1 and int(per_token.max()) <= 4
    assert per_token.min() < per_token.max()
    torch.testing.assert_close(out, expected.reshape(3, 5, 8))
    summary = layer.get_performance_summary()
    assert summary["computational_efficiency"] == pytest.approx(
        float(per_token.sum()) / (15 * 4))
    assert summary["router_stats"]["total_tokens"] == 15


def test_dynamic_router_gets_gradients_through_layernorm_moe():
    layer = dynamic_layer(LayerNormMoE)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(14))
    layer(x).square().mean().backward()
    grad = layer.router.gate.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert layer.norm.weight.grad is not None


def test_run_experts_grouped_rejects_out_of_range_index():
    experts = [nn.Linear(3, 3) for _ in range(3)]
    with pytest.raises(ExpertDispatchError, match="expert index 3 out of range"):
        run_experts_grouped(torch.randn(2, 3), torch.tensor([[0, 3], [1, -1]]),
                            torch.ones(2, 2), experts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_on_cuda_matches_cpu():
    layer = make_layer()
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        expected = layer(x)
        got = layer.to("cuda")(x.to("cuda")).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
