"""DynamicRouter and AdaptiveRouter: hand-made gates, k bounds, balancing bias, seed API."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.errors import (
    ComplexityEstimationError,
    RouterConfigurationError,
    ValidationError,
)
from moe_router.routing.dynamic import (
    AdaptiveRouter,
    DynamicRouter,
    RoutingStrategy,
    threshold_counts,
)
from moe_router.routing.estimators import (
    AttentionEntropyEstimator,
    GradientNormEstimator,
    ThresholdEstimator,
)
from moe_router.routing.router_config import RouterConfig
from moe_router.routing.topk import TopKRouter

SEED_ROUTE_KEYS = {
    "expert_indices",
    "expert_weights",
    "num_experts_per_token",
    "complexity_scores",
    "routing_info",
}
SEED_USAGE_KEYS = {
    "total_batches",
    "avg_usage_per_expert",
    "usage_variance",
    "most_used_expert",
    "least_used_expert",
    "load_balance_score",
}


def fixed_complexity(values: list[float]) -> ThresholdEstimator:
    """An estimator that scores the tokens of a [T, D] call with ``values``."""
    return ThresholdEstimator(threshold_fn=lambda h: torch.tensor(values))


def identity_gate_router(**kwargs) -> DynamicRouter:
    """A 4-expert router over 4 features whose logits are the hidden states themselves,
    so feeding log-probabilities gives exactly those routing probabilities."""
    kwargs.setdefault("load_balancing", False)
    router = DynamicRouter(input_dim=4, num_experts=4, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    return router


def log_probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).log()


# --------------------------------------------------------------------------- construction
def test_defaults_and_k_range() -> None:
    router = DynamicRouter(16, 8)
    assert router.k_range == (1, 4)  # max_experts None -> num_experts // 2
    assert router.routing_strategy is RoutingStrategy.TOP_K
    assert isinstance(router.estimator, GradientNormEstimator)
    assert router.config.top_k == 4 and router.config.hidden_size == 16
    assert DynamicRouter(4, 1).k_range == (1, 1)
    assert DynamicRouter(4, 3, min_experts=2).k_range == (2, 2)


def test_estimator_kwargs_reach_the_estimator() -> None:
    router = DynamicRouter(8, 4, complexity_estimator="gradient_norm", percentile=80.0)
    assert router.estimator.percentile == 80.0
    est = AttentionEntropyEstimator(head_aggregation="max")
    assert DynamicRouter(8, 4, complexity_estimator=est).estimator is est


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"min_experts": 3, "max_experts": 2}, "max_experts"),
        ({"max_experts": 9}, "max_experts"),
        ({"min_experts": 0}, "min_experts"),
        ({"min_experts": 9}, "min_experts"),
        ({"routing_strategy": "top_p"}, "routing_strategy.*'top_k', 'threshold'"),
        ({"complexity_estimator": "entropy"}, "complexity_estimator.*'gradient_norm'"),
        ({"top_p": 0.0}, r"top_p.*\(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"noise_factor": -0.1}, r"noise_factor.*\[0, 1\]"),
        ({"noise_factor": 1.5}, "noise_factor"),
        ({"bias_update_rate": -1.0}, "bias_update_rate"),
        ({"input_dim": 0}, "input_dim"),
        ({"num_experts": 0}, "num_experts"),
        ({"load_balancing": "yes"}, "load_balancing"),
        ({"complexity_estimator": ThresholdEstimator(), "percentile": 90.0}, "instance"),
        ({"percentile": 10.0}, "percentile"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs: dict, name: str) -> None:
    args = {"input_dim": 8, "num_experts": 8, **kwargs}
    with pytest.raises(RouterConfigurationError, match=name):
        DynamicRouter(**args)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"adaptation_rate": 0.0}, "adaptation_rate"), ({"target_performance": math.nan}, "target")],
)
def test_adaptive_invalid_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(RouterConfigurationError, match=name):
        AdaptiveRouter(input_dim=8, num_experts=4, **kwargs)


# --------------------------------------------------------------------------- top_k strategy
def test_top_k_strategy_hand_case() -> None:
    router = identity_gate_router(
        min_experts=1, max_experts=3, complexity_estimator=fixed_complexity([0.0, 0.4, 0.9, 0.2])
    )
    x = log_probs(
        [
            [0.4, 0.3, 0.2, 0.1],  # c 0.0 -> k 1
            [0.1, 0.2, 0.3, 0.4],  # c 0.4 -> k 1 + round(0.8) = 2
            [0.25, 0.25, 0.4, 0.1],  # c 0.9 -> k 1 + round(1.8) = 3; tie -> lower index
            [0.1, 0.6, 0.2, 0.1],  # c 0.2 -> k 1 + round(0.4) = 1
        ]
    )
    out = router.route(x)
    torch.testing.assert_close(
        out["expert_indices"],
        torch.tensor([[0, -1, -1], [3, 2, -1], [2, 0, 1], [1, -1, -1]], dtype=torch.int32),
    )
    torch.testing.assert_close(
        out["expert_weights"],
        torch.tensor(
            [
                [1.0, 0.0, 0.0],
                [4 / 7, 3 / 7, 0.0],
                [0.4 / 0.9, 0.25 / 0.9, 0.25 / 0.9],
                [1.0, 0.0, 0.0],
            ]
        ),
    )
    torch.testing.assert_close(
        out["num_experts_per_token"], torch.tensor([1, 2, 3, 1], dtype=torch.int32)
    )
    torch.testing.assert_close(out["complexity_scores"], torch.tensor([0.0, 0.4, 0.9, 0.2]))
    info = out["routing_info"]
    assert info["strategy"] == "top_k"
    assert info["avg_experts_per_token"] == pytest.approx(7 / 4)
    torch.testing.assert_close(info["tokens_per_expert"], torch.tensor([2, 2, 2, 1]))


def test_equal_min_and_max_matches_mixtral_reference() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    config = pytest.importorskip("transformers").MixtralConfig(
        hidden_size=32, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=4,
    )
    reference = mixtral.MixtralTopKRouter(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(8, 32, generator=gen))
    router = DynamicRouter(32, 8, 2, 2, complexity_estimator="threshold", load_balancing=False)
    with torch.no_grad():
        router.gate.weight.copy_(reference.weight)
    x = torch.randn(64, 32, generator=gen)
    _, ref_weights, ref_indices = reference(x)
    out = router(x)
    order = ref_indices.argsort(dim=-1)
    ours = out.expert_indices.long().argsort(dim=-1)
    torch.testing.assert_close(
        out.expert_indices.long().gather(-1, ours), ref_indices.gather(-1, order)
    )
    torch.testing.assert_close(
        out.expert_weights.gather(-1, ours), ref_weights.gather(-1, order), atol=1e-6, rtol=0
    )


def test_fixed_k_matches_top_k_router() -> None:
    torch.manual_seed(6)
    router = DynamicRouter(16, 6, 3, 3, complexity_estimator="threshold", load_balancing=False)
    topk = TopKRouter(RouterConfig(hidden_size=16, num_experts=6, top_k=3))
    topk.gate.load_state_dict(router.gate.state_dict())
    x = torch.randn(2, 10, 16)
    ours, ref = router(x), topk(x)
    torch.testing.assert_close(ours.expert_indices, ref.expert_indices)
    torch.testing.assert_close(ours.expert_weights, ref.expert_weights)


# --------------------------------------------------------------------------- threshold strategy
PROBS = [[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [0.35, 0.3, 0.2, 0.15]]


def test_threshold_strategy_default_top_p() -> None:
    router = identity_gate_router(
        min_experts=1, max_experts=3, routing_strategy="threshold",
        complexity_estimator="threshold",
    )
    out = router.route(log_probs(PROBS))
    # top_p 0.4: cumsum 0.5 -> k 1; 0.25, 0.5 -> k 2; 0.35, 0.65 -> k 2
    torch.testing.assert_close(
        out["expert_indices"], torch.tensor([[0, -1, -1], [0, 1, -1], [0, 1, -1]]).int()
    )
    torch.testing.assert_close(
        out["expert_weights"],
        torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.35 / 0.65, 0.3 / 0.65, 0.0]]),
    )
    assert out["complexity_scores"].shape == (3,)
    assert out["routing_info"]["strategy"] == "threshold"


def test_threshold_strategy_clamps_to_k_range() -> None:
    high = identity_gate_router(
        min_experts=1, max_experts=3, routing_strategy="threshold", top_p=0.9,
        complexity_estimator="threshold",
    )
    # top_p 0.9: k = 3, 4, 4 -> clamped to max 3
    torch.testing.assert_close(
        high.route(log_probs(PROBS))["num_experts_per_token"], torch.tensor([3, 3, 3]).int()
    )
    low = identity_gate_router(
        min_experts=2, max_experts=3, routing_strategy="threshold",
        complexity_estimator="threshold",
    )
    torch.testing.assert_close(
        low.route(log_probs(PROBS))["num_experts_per_token"], torch.tensor([2, 2, 2]).int()
    )


def test_threshold_counts() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(threshold_counts(probs, 0.6), torch.tensor([2, 1, 2]))
    torch.testing.assert_close(threshold_counts(probs, 1.0), torch.tensor([3, 3, 3]))


# --------------------------------------------------------------------------- load balancing
def test_bias_update_by_hand() -> None:
    router = identity_gate_router(
        min_experts=1, max_experts=1, load_balancing=True, bias_update_rate=0.1,
        complexity_estimator="threshold",
    )
    assert router.stateful
    first = log_probs([[0.7, 0.1, 0.1, 0.1]] * 3 + [[0.1, 0.7, 0.1, 0.1]])
    router.route(first)
    # load [3, 1, 0, 0], mean 1: bias += 0.1 * sign(1 - load)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    # probs + bias = [0.2, 0.25, 0.35, 0.3] -> expert 2, though expert 0 is most probable
    out = router.route(log_probs([[0.3, 0.25, 0.25, 0.2]]))
    torch.testing.assert_close(out["expert_indices"], torch.tensor([[2]]).int())
    # load [0, 0, 1, 0], mean 0.25
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.1, 0.0, 0.2]))


def test_bias_changes_selection_not_weights() -> None:
    router = identity_gate_router(
        min_experts=2, max_experts=2, load_balancing=True, bias_update_rate=0.0,
        complexity_estimator="threshold",
    )
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    out = router.route(log_probs([[0.3, 0.25, 0.25, 0.2]]))
    torch.testing.assert_close(out["expert_indices"], torch.tensor([[2, 3]]).int())
    torch.testing.assert_close(out["expert_weights"], torch.tensor([[0.25 / 0.45, 0.2 / 0.45]]))
    router.reset_expert_bias()
    torch.testing.assert_close(router.expert_bias, torch.zeros(4))


def test_balancing_evens_out_a_skewed_gate() -> None:
    torch.manual_seed(7)
    router = DynamicRouter(
        8, 4, 1, 1, complexity_estimator="threshold", bias_update_rate=0.05
    )
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0].fill_(0.3)  # expert 0 favoured for positive-sum tokens
    x = torch.randn(256, 8).abs()
    first = router(x).tokens_per_expert
    for _ in range(20):
        last = router(x).tokens_per_expert
    assert int(last.max()) < int(first.max())


def test_aux_loss_is_one_for_uniform_probabilities() -> None:
    router = identity_gate_router(min_experts=1, max_experts=3, complexity_estimator="threshold")
    out = router.route(log_probs([[0.25] * 4] * 5))
    torch.testing.assert_close(out["routing_info"]["aux_loss"], torch.tensor(1.0))


# --------------------------------------------------------------------------- seed API
def test_route_keys_shapes_and_dtypes() -> None:
    torch.manual_seed(8)
    router = DynamicRouter(16, 8, 1, 4)
    x = torch.randn(2, 5, 16)
    out = router.route(x)
    assert set(out) == SEED_ROUTE_KEYS
    assert out["expert_indices"].shape == (2, 5, 4) and out["expert_indices"].dtype == torch.int32
    assert out["expert_weights"].shape == (2, 5, 4)
    assert out["num_experts_per_token"].shape == (2, 5)
    assert out["complexity_scores"].shape == (2, 5)
    assert out["complexity_scores"].dtype == torch.float32
    info = out["routing_info"]
    for key in ("aux_loss", "z_loss", "tokens_per_expert", "dropped_tokens",
                "avg_experts_per_token", "strategy"):
        assert key in info
    with_logits = router.route(x, return_router_logits=True)
    assert set(with_logits) == SEED_ROUTE_KEYS | {"router_logits"}
    assert with_logits["router_logits"].shape == (2, 5, 8)


def test_flat_and_empty_inputs() -> None:
    router = DynamicRouter(16, 8, 1, 4)
    out = router.route(torch.randn(6, 16))
    assert out["expert_indices"].shape == (6, 4) and out["complexity_scores"].shape == (6,)
    empty = router.route(torch.zeros(0, 16))
    assert empty["expert_indices"].shape == (0, 4) and empty["routing_info"]["dropped_tokens"] == 0


def test_bf16_input_routes_in_fp32() -> None:
    torch.manual_seed(9)
    out = DynamicRouter(16, 8, 1, 4).route(torch.randn(2, 3, 16).bfloat16())
    assert out["expert_weights"].dtype == torch.float32
    assert out["complexity_scores"].dtype == torch.float32


def test_usage_stats_keys_and_counts() -> None:
    torch.manual_seed(10)
    router = DynamicRouter(16, 8, 1, 4)
    router.route(torch.randn(3, 16))
    router.route(torch.randn(2, 2, 16))
    stats = router.get_expert_usage_stats()
    assert set(stats) == SEED_USAGE_KEYS
    assert stats["total_batches"] == 2
    assert len(stats["avg_usage_per_expert"]) == 8
    assert 0.0 < stats["load_balance_score"] <= 1.0


def test_estimator_context_travels_through_route() -> None:
    router = DynamicRouter(8, 4, 1, 3, complexity_estimator="attention_entropy")
    x = torch.randn(1, 4, 8)
    uniform = router.route(x, attention_weights=torch.full((1, 2, 4, 4), 0.25))
    torch.testing.assert_close(uniform["num_experts_per_token"], torch.full((1, 4), 3).int())
    one_hot = router.route(x, attention_weights=torch.eye(4).expand(1, 2, 4, 4))
    torch.testing.assert_close(one_hot["num_experts_per_token"], torch.ones(1, 4).int())
    with pytest.raises(ComplexityEstimationError, match="attention_weights"):
        router.route(x)


def test_lm_logits_keyword_reaches_the_estimator() -> None:
    router = DynamicRouter(8, 4, 1, 3, complexity_estimator="perplexity_proxy")
    x = torch.randn(2, 3, 8)
    flat_lm = router.route(x, logits=torch.zeros(2, 3, 50))
    torch.testing.assert_close(flat_lm["complexity_scores"], torch.ones(2, 3))
    torch.testing.assert_close(flat_lm["num_experts_per_token"], torch.full((2, 3), 3).int())


def test_route_many_answers_each_call_as_alone() -> None:
    torch.manual_seed(11)
    router = DynamicRouter(
        16, 8, 1, 4, complexity_estimator="perplexity_proxy", load_balancing=False
    )
    assert not router.couples_tokens_now and not router.stateful
    calls = [torch.randn(5, 16), torch.randn(2, 3, 16)]
    merged = router.route_many(calls)
    for call, out in zip(calls, merged, strict=True):
        alone = router(call)
        torch.testing.assert_close(out.expert_indices, alone.expert_indices)
        torch.testing.assert_close(out.expert_weights, alone.expert_weights)
        torch.testing.assert_close(out.complexity_scores, alone.complexity_scores)
    balancing = DynamicRouter(16, 8, 1, 4, complexity_estimator="perplexity_proxy")
    with pytest.raises(ValidationError, match="couples"):
        balancing.route_many(calls)


# --------------------------------------------------------------------------- calibration
CALIBRATION_CASES = [
    ("gradient_norm", lambda g: {}),
    ("gradient_norm", lambda g: {"gradients": torch.randn(4, 32, 64, generator=g)}),
    ("threshold", lambda g: {}),
    ("perplexity_proxy", lambda g: {}),
    ("perplexity_proxy", lambda g: {"logits": torch.randn(4, 32, 100, generator=g) * 3}),
    (
        "attention_entropy",
        lambda g: {
            "attention_weights": torch.softmax(torch.randn(4, 8, 32, 32, generator=g) * 2, -1)
        },
    ),
]


@pytest.mark.parametrize("estimator, context", CALIBRATION_CASES)
@pytest.mark.parametrize("strategy", ["top_k", "threshold"])
def test_mean_k_sits_strictly_inside_the_range(estimator: str, context, strategy: str) -> None:
    """The seed's original squashed scores through a sigmoid, so every token got max_experts."""
    torch.manual_seed(12)
    gen = torch.Generator().manual_seed(13)
    router = DynamicRouter(64, 8, 1, 4, complexity_estimator=estimator, routing_strategy=strategy)
    k = router.route(torch.randn(4, 32, 64, generator=gen), **context(gen))
    mean_k = float(k["num_experts_per_token"].float().mean())
    assert 1.1 < mean_k < 3.9, f"{estimator}: mean k {mean_k}"


# --------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    data=st.data(),
    tokens=st.integers(1, 12),
    estimator=st.sampled_from(["gradient_norm", "threshold", "perplexity_proxy"]),
    strategy=st.sampled_from(["top_k", "threshold"]),
    noise=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_selection_invariants(
    num_experts: int, data, tokens: int, estimator: str, strategy: str, noise: float, seed: int
) -> None:
    lo = data.draw(st.integers(1, num_experts))
    hi = data.draw(st.integers(lo, num_experts))
    torch.manual_seed(seed)
    router = DynamicRouter(
        6, num_experts, lo, hi, complexity_estimator=estimator, routing_strategy=strategy,
        noise_factor=noise,
    )
    x = torch.randn(tokens, 6) * data.draw(st.sampled_from([0.1, 1.0, 10.0]))
    out = router.route(x, generator=torch.Generator().manual_seed(seed))
    k = out["num_experts_per_token"]
    assert bool(((k >= lo) & (k <= hi)).all())
    idx, w = out["expert_indices"], out["expert_weights"]
    valid = idx >= 0
    torch.testing.assert_close(valid.sum(-1).int(), k)
    assert bool((w[~valid] == 0).all()) and bool((w[valid] > 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(tokens))
    for row, n in zip(idx.tolist(), k.tolist(), strict=True):
        assert len(set(row[:n])) == n and all(e >= 0 for e in row[:n])
    assert bool(((out["complexity_scores"] >= 0) & (out["complexity_scores"] <= 1)).all())


# --------------------------------------------------------------------------- noise
def test_noise_is_reproducible_with_a_generator() -> None:
    torch.manual_seed(14)
    router = DynamicRouter(16, 8, 1, 4, noise_factor=0.5, complexity_estimator="threshold",
                           load_balancing=False)
    assert router.stochastic
    x = torch.randn(64, 16)
    a = router.route(x, generator=torch.Generator().manual_seed(1))
    b = router.route(x, generator=torch.Generator().manual_seed(1))
    c = router.route(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a["expert_indices"], b["expert_indices"])
    torch.testing.assert_close(a["expert_weights"], b["expert_weights"])
    assert not torch.equal(a["expert_weights"], c["expert_weights"])
    quiet = DynamicRouter(16, 8, 1, 4, load_balancing=False, complexity_estimator="threshold")
    assert not quiet.stochastic and not quiet.stateful


def test_statefulness() -> None:
    assert DynamicRouter(8, 4).stateful  # balancing bias and running percentiles
    assert DynamicRouter(8, 4, load_balancing=False).stateful  # running percentiles
    assert not DynamicRouter(8, 4, load_balancing=False, complexity_estimator="threshold").stateful
    assert AdaptiveRouter(input_dim=8, num_experts=4, load_balancing=False,
                          complexity_estimator="threshold").stateful


# --------------------------------------------------------------------------- predict_k / adaptive
def test_predict_k_matches_route_and_moves_nothing() -> None:
    torch.manual_seed(15)
    router = AdaptiveRouter(input_dim=16, num_experts=8, min_experts=1, max_experts=4)
    x = torch.randn(2, 6, 16)
    router.route(torch.randn(2, 6, 16))  # warm the running percentiles
    bias = router.expert_bias.clone()
    low, high = router.estimator.running_low, router.estimator.running_high
    batches = router.get_expert_usage_stats()["total_batches"]
    k = router.predict_k(x)
    assert k.shape == (2, 6) and k.dtype == torch.int32
    torch.testing.assert_close(router.expert_bias, bias)
    assert router.estimator.running_low is low and router.estimator.running_high is high
    assert router.get_expert_usage_stats()["total_batches"] == batches
    torch.testing.assert_close(router.route(x)["num_experts_per_token"], k)


def test_adaptive_update_thresholds_by_hand() -> None:
    router = AdaptiveRouter(
        adaptation_rate=0.1, input_dim=4, num_experts=4, min_experts=1, max_experts=3,
        complexity_estimator=fixed_complexity([0.3, 0.3]), load_balancing=False,
    )
    assert (router.min_k, router.max_k) == (1, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(router.predict_k(x), torch.tensor([2, 2]).int())  # 1+round(0.6)
    router.update_thresholds(1.0)  # offset -= 0.1 * (1.0 - 0.5)
    torch.testing.assert_close(router.complexity_offset(), torch.tensor(-0.05))
    router.update_thresholds(1.0)
    torch.testing.assert_close(router.complexity_offset(), torch.tensor(-0.1))
    torch.testing.assert_close(router.predict_k(x), torch.tensor([1, 1]).int())  # 1+round(0.4)
    for _ in range(12):
        router.update_thresholds(0.0)  # offset += 0.05 each: 0.5
    torch.testing.assert_close(router.complexity_offset(), torch.tensor(0.5))
    torch.testing.assert_close(router.predict_k(x), torch.tensor([3, 3]).int())  # 1+round(1.6)
    router.update_thresholds(-100.0)
    torch.testing.assert_close(router.complexity_offset(), torch.tensor(1.0))  # clamped


def test_adaptive_offset_moves_top_p() -> None:
    router = AdaptiveRouter(
        adaptation_rate=1.0, input_dim=4, num_experts=4, min_experts=1, max_experts=4,
        routing_strategy="threshold", complexity_estimator="threshold", load_balancing=False,
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = log_probs([[0.35, 0.3, 0.2, 0.15]])
    torch.testing.assert_close(router.predict_k(x), torch.tensor([2]).int())  # top_p 0.4
    router.update_thresholds(0.0)  # offset +0.5 -> top_p 0.9: 0.35, 0.65, 0.85, 1.0
    torch.testing.assert_close(router.predict_k(x), torch.tensor([4]).int())
    router.update_thresholds(1.2)  # offset 0.5 - 0.7 = -0.2 -> top_p 0.2
    torch.testing.assert_close(router.predict_k(x), torch.tensor([1]).int())


@pytest.mark.parametrize("score", [math.nan, math.inf, "good", None])
def test_adaptive_rejects_bad_performance_score(score) -> None:
    router = AdaptiveRouter(input_dim=4, num_experts=4)
    with pytest.raises(ValidationError, match="performance_score"):
        router.update_thresholds(score)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(16)
    router = DynamicRouter(
        32, 8, 1, 4, complexity_estimator="perplexity_proxy", load_balancing=False
    )
    x = torch.randn(4, 16, 32)
    cpu = router.route(x)
    gpu = router.cuda().route(x.cuda())
    torch.testing.assert_close(gpu["num_experts_per_token"].cpu(), cpu["num_experts_per_token"])
    torch.testing.assert_close(
        gpu["expert_weights"].cpu(), cpu["expert_weights"], atol=1e-5, rtol=0
    )
