"""Properties every router's answer keeps (hypothesis), and the input/argument contract
shared by all routers: named errors, half precision, [B, S, D] vs [B*S, D], CPU vs CUDA."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import (
    ExpertChoiceRouter,
    GroupedTopKRouter,
    MLPTopKRouter,
    RouterBase,
    RouterConfig,
    SoftMoERouter,
    TopKRouter,
)

HIDDEN = 12


def _topk(e: int, k: int) -> RouterBase:
    return TopKRouter(RouterConfig(hidden_size=HIDDEN, num_experts=e, top_k=k))


def _topk_sigmoid(e: int, k: int) -> RouterBase:
    config = RouterConfig(
        hidden_size=HIDDEN, num_experts=e, top_k=k, scoring="sigmoid", renormalize=False
    )
    return TopKRouter(config)


def _grouped(e: int, k: int) -> RouterBase:
    config = RouterConfig(
        hidden_size=HIDDEN,
        num_experts=e,
        top_k=k,
        n_group=e // 2,
        topk_group=max(1, (k + 1) // 2),
        group_score="top2_sum",
        scoring="sigmoid",
        routed_scaling_factor=2.5,
    )
    router = GroupedTopKRouter(config, use_correction_bias=True)
    router.e_score_correction_bias.copy_(0.1 * torch.randn(e))
    return router


def _expert_choice(e: int, k: int) -> RouterBase:
    config = RouterConfig(hidden_size=HIDDEN, num_experts=e, renormalize=False, capacity_factor=k)
    return ExpertChoiceRouter(config)


def _soft_moe(e: int, k: int) -> RouterBase:
    return SoftMoERouter(RouterConfig(hidden_size=HIDDEN, num_experts=e), slots_per_expert=2)


def _mlp(e: int, k: int) -> RouterBase:
    return MLPTopKRouter(RouterConfig(hidden_size=HIDDEN, num_experts=e, top_k=k), [16])


FACTORIES: dict[str, Callable[[int, int], RouterBase]] = {
    "topk": _topk,
    "topk_sigmoid": _topk_sigmoid,
    "grouped": _grouped,
    "expert_choice": _expert_choice,
    "soft_moe": _soft_moe,
    "mlp": _mlp,
}


def _build(name: str, num_experts: int = 8, top_k: int = 2, seed: int = 0) -> RouterBase:
    torch.manual_seed(seed)
    return FACTORIES[name](num_experts, top_k).eval()


def _assert_consistent_padding(out, num_experts: int) -> None:
    idx = out.expert_indices.reshape(-1, out.k_max).long()
    w = out.expert_weights.reshape(-1, out.k_max)
    valid = idx >= 0
    assert bool((w >= 0).all()), "negative weight"
    assert torch.equal(valid, w != 0), "index -1 must go with weight 0 and only with it"
    assert bool((idx < num_experts).all())
    # Real slots first: once a slot is padding, every later one is.
    assert bool((valid[:, 1:] <= valid[:, :-1]).all()), "padding before a real slot"
    assert out.num_experts_per_token.reshape(-1).tolist() == valid.sum(-1).tolist()
    # No expert twice for a token.
    sorted_idx = torch.where(valid, idx, -1 - torch.arange(idx.shape[1])).sort(-1).values
    assert bool((sorted_idx[:, 1:] != sorted_idx[:, :-1]).all()), "expert repeated"
    counts = torch.bincount(idx[valid], minlength=num_experts)
    assert out.tokens_per_expert.tolist() == counts.tolist()


ROUTING_CASES = st.tuples(
    st.sampled_from(sorted(FACTORIES)),
    st.sampled_from([4, 8, 16]),
    st.integers(1, 4),
    st.integers(1, 24),
    st.floats(0.1, 4.0),
    st.integers(0, 2**16),
)


@settings(max_examples=50, deadline=None)
@given(ROUTING_CASES)
def test_answers_are_consistent(case):
    name, num_experts, top_k, num_tokens, scale, seed = case
    router = _build(name, num_experts, top_k, seed)
    x = scale * torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    out = router(x)
    _assert_consistent_padding(out, num_experts)
    lo, hi = router.k_range
    counts = out.num_experts_per_token
    assert bool(((counts >= lo) & (counts <= hi)).all())
    if name in ("topk", "topk_sigmoid", "grouped", "mlp"):
        assert counts.tolist() == [top_k] * num_tokens
    if name in ("topk", "mlp"):
        torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(num_tokens))
    if name == "grouped":
        torch.testing.assert_close(out.expert_weights.sum(-1), torch.full((num_tokens,), 2.5))
    if name == "expert_choice":
        capacity = router.capacity(num_tokens)
        assert capacity <= num_tokens
        assert out.tokens_per_expert.tolist() == [capacity] * num_experts
    if name == "soft_moe":
        torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(num_tokens))
        torch.testing.assert_close(out.combine_weights.sum(-1), torch.ones(num_tokens))
        torch.testing.assert_close(out.dispatch_weights.sum(0), torch.ones(2 * num_experts))


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(["topk", "topk_sigmoid", "grouped"]),
    st.sampled_from([4, 8, 16]),
    st.integers(1, 4),
    st.integers(1, 12),
)
def test_equal_logits_choose_the_lowest_experts(name, num_experts, top_k, num_tokens):
    router = _build(name, num_experts, top_k)
    if name == "grouped":
        router.e_score_correction_bias.zero_()
    out = router(torch.zeros(num_tokens, HIDDEN))
    assert out.expert_indices.tolist() == [list(range(top_k))] * num_tokens


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 3), st.integers(1, 12))
def test_expert_choice_ties_go_to_the_earliest_tokens(num_experts, factor, num_tokens):
    router = _build("expert_choice", num_experts, factor)
    out = router(torch.zeros(num_tokens, HIDDEN))
    capacity = router.capacity(num_tokens)
    expected = [num_experts if t < capacity else 0 for t in range(num_tokens)]
    assert out.num_experts_per_token.tolist() == expected


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["topk", "topk_sigmoid", "grouped", "mlp"]), st.integers(2, 40))
def test_per_token_routers_ignore_the_other_tokens(name, num_tokens):
    """A token's experts are the same alone and in a batch (no coupling between tokens)."""
    router = _build(name)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    together = router(x)
    alone = router(x[-1:])
    assert together.expert_indices[-1].tolist() == alone.expert_indices[0].tolist()
    torch.testing.assert_close(
        together.expert_weights[-1:], alone.expert_weights, atol=1e-6, rtol=0
    )


# ----------------------------------------------------------------- the shared input contract
ALL = sorted(FACTORIES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(4, HIDDEN + 1), "dim"),
        (torch.zeros(HIDDEN), "shape"),
        (torch.zeros(2, 2, 2, HIDDEN), "shape"),
        (torch.zeros(4, HIDDEN, dtype=torch.int32), "dtype"),
        (torch.zeros(4, HIDDEN, dtype=torch.float64), "dtype"),
        ([[0.0] * HIDDEN], "torch.Tensor"),
    ],
)
def test_bad_input_raises_validation_error(name, bad, message):
    with pytest.raises(ValidationError, match=message):
        _build(name)(bad)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_routes_like_its_fp32_upcast(name, dtype):
    router = _build(name)
    x = torch.randn(20, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    low, upcast = router(x), router(x.float())
    assert torch.equal(low.expert_indices, upcast.expert_indices)
    torch.testing.assert_close(low.expert_weights, upcast.expert_weights, rtol=0, atol=0)
    assert low.router_logits.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_batched_input_equals_flat_input_reshaped(name):
    router = _build(name)
    x = torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(2))
    batched, flat = router(x), router(x.reshape(21, HIDDEN))
    assert batched.expert_indices.shape[:2] == (3, 7)
    assert batched.num_experts_per_token.shape == (3, 7)
    k = flat.k_max
    assert torch.equal(batched.expert_indices.reshape(21, k), flat.expert_indices)
    torch.testing.assert_close(batched.expert_weights.reshape(21, k), flat.expert_weights)
    torch.testing.assert_close(batched.router_logits.reshape(21, -1), flat.router_logits)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=True), "hidden_size"),
        (dict(hidden_size=8.0), "hidden_size"),
        (dict(num_experts=-1), "num_experts"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=9), "top_k"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(jitter_noise=1.0), "jitter_noise"),
        (dict(jitter_noise=-0.1), "jitter_noise"),
        (dict(n_group=3), "n_group"),
        (dict(topk_group=0), "topk_group"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(scoring="tanh"), "scoring"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(routing_method="hashing"), "routing_method"),
        (dict(group_score="mean"), "group_score"),
    ],
)
def test_router_config_names_the_bad_field(fields, name):
    arguments = dict(hidden_size=8, num_experts=8, top_k=2)
    arguments.update(fields)
    with pytest.raises(RouterConfigurationError, match=name):
        RouterConfig(**arguments)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cpu_and_cuda_choose_the_same_experts(name):
    router = _build(name, num_experts=16, top_k=4)
    x = torch.randn(2, 64, HIDDEN, generator=torch.Generator().manual_seed(3))
    on_cpu = router(x)
    on_gpu = router.to("cuda")(x.to("cuda")).to("cpu")
    assert torch.equal(on_cpu.expert_indices, on_gpu.expert_indices)
    torch.testing.assert_close(on_cpu.expert_weights, on_gpu.expert_weights, rtol=1e-4, atol=1e-5)
