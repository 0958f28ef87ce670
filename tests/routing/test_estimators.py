"""Complexity estimators: hand-computed scores, shapes, dtype, errors and the factory."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical

from moe_router.errors import ComplexityEstimationError, RouterConfigurationError
from moe_router.routing.estimators import (
    AttentionEntropyEstimator,
    ComplexityEstimator,
    EstimatorName,
    GradientNormEstimator,
    HeadAggregation,
    PerplexityProxyEstimator,
    ThresholdEstimator,
    get_estimator,
)


def rows_with_norms(norms: list[float]) -> torch.Tensor:
    """[T, 2] rows whose L2 norms are ``norms`` (3-4-5 triangles scaled)."""
    return torch.tensor([[0.6 * n, 0.8 * n] for n in norms])


# --------------------------------------------------------------------------- base
def test_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        ComplexityEstimator()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "kwargs, name", [({"epsilon": 0.0}, "epsilon"), ({"normalize": 1}, "normalize")]
)
def test_base_arguments_checked(kwargs: dict, name: str) -> None:
    with pytest.raises(RouterConfigurationError, match=name):
        ThresholdEstimator(**kwargs)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4)])
def test_hidden_states_must_be_2d_or_3d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ComplexityEstimationError, match="hidden_states"):
        ThresholdEstimator().estimate(torch.randn(shape))


# --------------------------------------------------------------------------- gradient norm
def test_gradient_norm_first_batch_scales_between_percentiles() -> None:
    est = GradientNormEstimator(percentile=75.0)
    scores = est.estimate(rows_with_norms([0.0, 1.0, 2.0, 3.0, 4.0]))
    # 25th percentile of [0..4] is 1, 75th is 3: score = clamp((n - 1) / 2, 0, 1)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(est.running_low, torch.tensor(1.0))
    torch.testing.assert_close(est.running_high, torch.tensor(3.0))


def test_gradient_norm_running_percentiles_are_an_ema() -> None:
    est = GradientNormEstimator(percentile=75.0, smoothing_factor=0.1)
    est.estimate(rows_with_norms([0.0, 1.0, 2.0, 3.0, 4.0]))
    scores = est.estimate(rows_with_norms([0.0, 2.0, 4.0, 6.0, 8.0]))  # batch low 2, high 6
    low, high = 0.9 * 1.0 + 0.1 * 2.0, 0.9 * 3.0 + 0.1 * 6.0
    expected = torch.tensor([(n - low) / (high - low) for n in (0.0, 2.0, 4.0, 6.0, 8.0)])
    torch.testing.assert_close(scores, expected.clamp(0, 1))
    torch.testing.assert_close(est.running_low, torch.tensor(low))
    torch.testing.assert_close(est.running_high, torch.tensor(high))


def test_gradient_norm_update_running_false_keeps_state() -> None:
    est = GradientNormEstimator(percentile=75.0)
    est.estimate(rows_with_norms([0.0, 1.0, 2.0, 3.0, 4.0]))
    est.estimate(rows_with_norms([10.0, 20.0, 30.0]), update_running=False)
    torch.testing.assert_close(est.running_low, torch.tensor(1.0))
    est.reset()
    assert est.running_low is None and est.running_high is None


def test_gradient_norm_uses_gradients_when_given() -> None:
    est = GradientNormEstimator(percentile=75.0)
    hidden = torch.randn(5, 2)
    scores = est.estimate(hidden, gradients=rows_with_norms([4.0, 3.0, 2.0, 1.0, 0.0]))
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))


def test_gradient_norm_gradients_shape_mismatch() -> None:
    with pytest.raises(ComplexityEstimationError, match="gradients"):
        GradientNormEstimator().estimate(torch.randn(2, 3, 4), gradients=torch.randn(2, 3, 5))


def test_gradient_norm_unnormalised_is_the_norm() -> None:
    est = GradientNormEstimator(normalize=False)
    torch.testing.assert_close(
        est.estimate(rows_with_norms([2.0, 5.0])), torch.tensor([2.0, 5.0])
    )


def test_gradient_norm_nan_input_raises() -> None:
    hidden = torch.randn(2, 4, 8)
    hidden[0, 1, 3] = float("nan")
    with pytest.raises(ComplexityEstimationError, match="non-finite"):
        GradientNormEstimator().estimate(hidden)


def test_gradient_norm_bf16_batched_input_gives_fp32_batch_scores() -> None:
    torch.manual_seed(0)
    scores = GradientNormEstimator().estimate(torch.randn(3, 7, 16).bfloat16())
    assert scores.shape == (3, 7) and scores.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"percentile": 50.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": "90"}, "percentile"),
        ({"smoothing_factor": 0.0}, "smoothing_factor"),
        ({"smoothing_factor": 1.5}, "smoothing_factor"),
    ],
)
def test_gradient_norm_invalid_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(RouterConfigurationError, match=name):
        GradientNormEstimator(**kwargs)


# --------------------------------------------------------------------------- attention entropy
def test_attention_uniform_is_one_one_hot_is_zero() -> None:
    hidden = torch.randn(1, 4, 8)
    uniform = torch.full((1, 4, 4), 0.25)
    one_hot = torch.eye(4).unsqueeze(0)
    est = AttentionEntropyEstimator()
    torch.testing.assert_close(est.estimate(hidden, attention_weights=uniform), torch.ones(1, 4))
    torch.testing.assert_close(est.estimate(hidden, attention_weights=one_hot), torch.zeros(1, 4))


def test_attention_half_mass_on_two_of_four_keys_is_one_half() -> None:
    attn = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])  # [B=1, S=1, K=4]: log 2 / log 4
    scores = AttentionEntropyEstimator().estimate(torch.randn(1, 1, 3), attention_weights=attn)
    torch.testing.assert_close(scores, torch.tensor([[0.5]]))


@pytest.mark.parametrize("aggregation, expected", [("mean", 0.5), ("max", 1.0), ("min", 0.0)])
def test_attention_head_aggregation(aggregation: str, expected: float) -> None:
    uniform = torch.full((3, 3), 1.0 / 3.0)
    one_hot = torch.eye(3)
    attn = torch.stack([uniform, one_hot]).unsqueeze(0)  # [B=1, H=2, S=3, K=3]
    est = AttentionEntropyEstimator(head_aggregation=aggregation)
    scores = est.estimate(torch.randn(1, 3, 4), attention_weights=attn)
    torch.testing.assert_close(scores, torch.full((1, 3), expected))


def test_attention_matches_categorical_entropy() -> None:
    torch.manual_seed(1)
    attn = torch.softmax(torch.randn(2, 4, 5, 6), dim=-1)  # [B, H, S, K=6]
    scores = AttentionEntropyEstimator().estimate(torch.randn(2, 5, 8), attention_weights=attn)
    expected = Categorical(probs=attn).entropy().mean(dim=1) / math.log(6)
    torch.testing.assert_close(scores, expected)


def test_attention_temperature_sharpens() -> None:
    attn = torch.tensor([[[0.8, 0.2]]])
    scores = AttentionEntropyEstimator(temperature=0.5).estimate(
        torch.randn(1, 1, 2), attention_weights=attn
    )
    p = [16.0 / 17.0, 1.0 / 17.0]  # 0.8^2 : 0.2^2, renormalised
    expected = -sum(q * math.log(q) for q in p) / math.log(2)
    torch.testing.assert_close(scores, torch.tensor([[expected]]))


def test_attention_flat_tokens_with_heads() -> None:
    attn = torch.full((2, 3, 3), 1.0 / 3.0)  # [H, T, K] for [T, D] hidden states
    scores = AttentionEntropyEstimator().estimate(torch.randn(3, 4), attention_weights=attn)
    torch.testing.assert_close(scores, torch.ones(3))


def test_attention_unnormalised_is_nats() -> None:
    est = AttentionEntropyEstimator(normalize=False)
    scores = est.estimate(torch.randn(1, 2, 3), attention_weights=torch.full((1, 2, 4), 0.25))
    torch.testing.assert_close(scores, torch.full((1, 2), math.log(4)))


def test_attention_missing_weights_says_what_is_needed() -> None:
    with pytest.raises(ComplexityEstimationError, match="needs attention_weights"):
        AttentionEntropyEstimator().estimate(torch.randn(1, 3, 4))


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 3, 3), (1, 2, 3, 4, 4), (3,)])
def test_attention_shape_mismatch(shape: tuple[int, ...]) -> None:
    with pytest.raises(ComplexityEstimationError, match="attention_weights"):
        AttentionEntropyEstimator().estimate(
            torch.randn(1, 3, 4), attention_weights=torch.rand(shape)
        )


def test_attention_negative_weights_rejected() -> None:
    attn = torch.tensor([[[1.5, -0.5]]])
    with pytest.raises(ComplexityEstimationError, match="non-negative"):
        AttentionEntropyEstimator().estimate(torch.randn(1, 1, 2), attention_weights=attn)


def test_attention_invalid_aggregation_lists_allowed() -> None:
    with pytest.raises(RouterConfigurationError, match="head_aggregation.*'mean'"):
        AttentionEntropyEstimator(head_aggregation="median")
    assert AttentionEntropyEstimator(head_aggregation=HeadAggregation.MAX).head_aggregation is (
        HeadAggregation.MAX
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_temperature_must_be_positive_and_finite(temperature: float) -> None:
    with pytest.raises(RouterConfigurationError, match="temperature"):
        AttentionEntropyEstimator(temperature=temperature)
    with pytest.raises(RouterConfigurationError, match="temperature"):
        PerplexityProxyEstimator(temperature=temperature)


# --------------------------------------------------------------------------- perplexity proxy
def test_perplexity_lm_logits_is_normalised_entropy() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 11) * 2
    scores = PerplexityProxyEstimator().estimate(torch.randn(2, 3, 4), logits=logits)
    expected = Categorical(logits=logits).entropy() / math.log(11)
    torch.testing.assert_close(scores, expected)


def test_perplexity_lm_logits_uniform_and_peaked() -> None:
    est = PerplexityProxyEstimator()
    hidden = torch.randn(1, 2, 4)
    torch.testing.assert_close(est.estimate(hidden, logits=torch.zeros(1, 2, 7)), torch.ones(1, 2))
    peaked = torch.zeros(1, 2, 7)
    peaked[..., 3] = 100.0
    torch.testing.assert_close(est.estimate(hidden, logits=peaked), torch.zeros(1, 2))


def test_perplexity_temperature_divides_logits() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 9)
    hidden = torch.randn(4, 2)
    hot = PerplexityProxyEstimator(temperature=2.0).estimate(hidden, logits=logits)
    cold = PerplexityProxyEstimator().estimate(hidden, logits=logits / 2.0)
    torch.testing.assert_close(hot, cold)


def test_perplexity_router_logits_effective_expert_fraction() -> None:
    # Two experts with probabilities 0.8 / 0.2: exp(H) - 1 over E - 1 = exp(H) - 1.
    router_logits = torch.tensor([[math.log(0.8), math.log(0.2)], [0.0, 0.0], [50.0, 0.0]])
    scores = PerplexityProxyEstimator().estimate(torch.randn(3, 5), router_logits=router_logits)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    torch.testing.assert_close(scores, torch.tensor([math.exp(h) - 1.0, 1.0, 0.0]))


def test_perplexity_router_logits_unnormalised_is_nats() -> None:
    scores = PerplexityProxyEstimator(normalize=False).estimate(
        torch.randn(2, 5), router_logits=torch.zeros(2, 8)
    )
    torch.testing.assert_close(scores, torch.full((2,), math.log(8)))


def test_perplexity_prefers_lm_logits() -> None:
    est = PerplexityProxyEstimator()
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    scores = est.estimate(torch.randn(1, 2), logits=peaked, router_logits=torch.zeros(1, 4))
    torch.testing.assert_close(scores, torch.zeros(1))


def test_perplexity_missing_logits_says_what_is_needed() -> None:
    with pytest.raises(ComplexityEstimationError, match="needs logits"):
        PerplexityProxyEstimator().estimate(torch.randn(2, 3, 4))


def test_perplexity_logits_shape_mismatch() -> None:
    with pytest.raises(ComplexityEstimationError, match="logits shape"):
        PerplexityProxyEstimator().estimate(torch.randn(2, 3, 4), logits=torch.randn(2, 4, 10))


# --------------------------------------------------------------------------- threshold
def test_threshold_default_outlier_fraction() -> None:
    hidden = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0],  # one of 8 beyond 1 std
            [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 3.0],  # two of 8
            [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # constant: none
        ]
    )
    scores = ThresholdEstimator().estimate(hidden)
    torch.testing.assert_close(scores, torch.tensor([0.125, 0.25, 0.0]))


def test_threshold_custom_function_is_clamped() -> None:
    est = ThresholdEstimator(threshold_fn=lambda h: h[..., 0] * 2)
    scores = est.estimate(torch.tensor([[[0.1, 9.0], [0.7, 9.0], [-1.0, 9.0]]]))
    torch.testing.assert_close(scores, torch.tensor([[0.2, 1.0, 0.0]]))


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda h: h.sum(), "shape"),
        (lambda h: h[..., 0] / 0.0, "non-finite"),
        (lambda h: [0.5] * h.shape[0], "tensor"),
    ],
)
def test_threshold_custom_function_errors(fn, message: str) -> None:
    with pytest.raises(ComplexityEstimationError, match=message):
        ThresholdEstimator(threshold_fn=fn).estimate(torch.ones(3, 2))


def test_threshold_fn_must_be_callable() -> None:
    with pytest.raises(RouterConfigurationError, match="threshold_fn"):
        ThresholdEstimator(threshold_fn=0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- factory
@pytest.mark.parametrize(
    "name, cls",
    [
        ("gradient_norm", GradientNormEstimator),
        ("attention_entropy", AttentionEntropyEstimator),
        ("perplexity_proxy", PerplexityProxyEstimator),
        ("threshold", ThresholdEstimator),
        (EstimatorName.THRESHOLD, ThresholdEstimator),
    ],
)
def test_get_estimator_by_name(name: str, cls: type) -> None:
    assert type(get_estimator(name)) is cls


def test_get_estimator_passes_kwargs_and_instances() -> None:
    est = get_estimator("gradient_norm", percentile=80.0, epsilon=1e-6)
    assert isinstance(est, GradientNormEstimator)
    assert est.percentile == 80.0 and est.epsilon == 1e-6
    assert get_estimator(est) is est
    with pytest.raises(RouterConfigurationError, match="instance"):
        get_estimator(est, percentile=70.0)


def test_get_estimator_unknown_name_lists_allowed() -> None:
    with pytest.raises(RouterConfigurationError, match="'gradient_norm'.*'threshold'.*'entropy'"):
        get_estimator("entropy")


def test_get_estimator_unexpected_argument() -> None:
    with pytest.raises(RouterConfigurationError, match="unexpected arguments.*'percentile'"):
        get_estimator("threshold", percentile=90.0)


# --------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    dim=st.integers(1, 8),
    experts=st.integers(1, 6),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_every_estimator_scores_in_unit_interval(
    batch: int, seq: int, dim: int, experts: int, scale: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=gen) * scale
    extra = {
        "attention_weights": torch.softmax(
            torch.randn(batch, 2, seq, seq, generator=gen) * scale, dim=-1
        ),
        "router_logits": torch.randn(batch, seq, experts, generator=gen) * scale,
    }
    for name in EstimatorName:
        scores = get_estimator(name).estimate(hidden, **extra)
        assert scores.shape == (batch, seq) and scores.dtype == torch.float32
        assert bool(((scores >= 0) & (scores <= 1)).all()), name
