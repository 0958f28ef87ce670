"""Complexity estimators: score each token in [0, 1] so a dynamic router can give harder
tokens more experts.

Every estimator takes hidden states ``[B, S, D]`` (or ``[T, D]``) and returns scores
``[B, S]`` (or ``[T]``) in float32, whatever the input dtype. Extra context travels as
keyword tensors: ``gradients`` (like hidden states), ``attention_weights``
(``[B, H, S, K]`` or ``[B, S, K]``), ``logits`` (LM logits ``[B, S, V]``) and
``router_logits`` (``[B, S, E]``, passed by the router itself).

The scores are calibrated to *spread* over [0, 1]: none of them squashes a
non-negative quantity through a sigmoid (which puts every score above 0.5 and makes
the router use ``max_experts`` for everything).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch

from moe_router.errors import ComplexityEstimationError, RouterConfigurationError

__all__ = [
    "EstimatorName",
    "HeadAggregation",
    "ComplexityEstimator",
    "GradientNormEstimator",
    "AttentionEntropyEstimator",
    "PerplexityProxyEstimator",
    "ThresholdEstimator",
    "get_estimator",
]


class EstimatorName(str, Enum):
    """The built-in estimators, by the name config.yaml and ``DynamicRouter`` use."""

    GRADIENT_NORM = "gradient_norm"
    ATTENTION_ENTROPY = "attention_entropy"
    PERPLEXITY_PROXY = "perplexity_proxy"
    THRESHOLD = "threshold"


class HeadAggregation(str, Enum):
    """How per-head attention entropies ``[B, H, S]`` become one score per token."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"


def _choice(enum_type: type[Enum], value: object, name: str) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_type)
        raise RouterConfigurationError(
            f"{name}: must be one of {allowed}, got {value!r}"
        ) from None


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RouterConfigurationError(f"{name}: must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise RouterConfigurationError(f"{name}: must be finite, got {value!r}")
    return float(value)


def _normalised_entropy(probs: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Entropy over the last dim of fp32 probabilities [..., N]; divided by log N if asked.

    A distribution over one outcome has entropy 0 (and normalised entropy 0).
    """
    entropy = -torch.xlogy(probs, probs).sum(dim=-1)
    n = probs.shape[-1]
    if normalize:
        return entropy / math.log(n) if n > 1 else torch.zeros_like(entropy)
    return entropy


class ComplexityEstimator(ABC):
    """Base of the estimators: scores ``[B, S]`` (or ``[T]``) in [0, 1], computed in fp32.

    normalize: map the raw quantity into [0, 1] (False returns the raw quantity,
        e.g. entropy in nats; the router clamps k either way).
    epsilon: small constant that keeps divisions finite.
    ``stateful`` is True when scores depend on batches seen before; ``couples_tokens``
    when a token's score depends on the other tokens of its batch.
    """

    stateful: bool = False
    couples_tokens: bool = False
    #: The keyword tensors it reads (None: unknown, e.g. a custom estimator, which then
    #: checks whatever it gets itself); ``requires``: those it cannot score without.
    reads: tuple[str, ...] | None = None
    requires: tuple[str, ...] = ()

    def __init__(self, normalize: bool = True, epsilon: float = 1e-8) -> None:
        if not isinstance(normalize, bool):
            raise RouterConfigurationError(f"normalize: must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.epsilon = _positive_float(epsilon, "epsilon")

    @property
    def name(self) -> str:
        """Short name of the estimator (its class name)."""
        return type(self).__name__

    @abstractmethod
    def estimate(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Scores ``[B, S]`` for hidden states ``[B, S, D]`` (``[T]`` for ``[T, D]``)."""

    # ----------------------------------------------------------------- input contract
    def input_problem(
        self, name: str, shape: tuple[int, ...], lead: tuple[int, ...], dim: int
    ) -> str | None:
        """Why input ``name`` of ``shape`` does not fit hidden states [*lead, dim], or
        None. The serving layer asks before the call runs, so a caller's wrong shape is
        its own error (INVALID_ARGUMENT), never a failed estimate."""
        return None

    def value_problem(self, name: str, values: torch.Tensor) -> str | None:
        """Why the values of input ``name`` cannot be scored, or None (checked with the
        other value checks, right before the pass)."""
        return None

    # ----------------------------------------------------------------- shared checks
    def _lead_shape(self, hidden_states: torch.Tensor) -> tuple[int, ...]:
        """Leading dims of hidden states [T, D] or [B, S, D]; raise if neither."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (2, 3):
            shape = list(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else None
            raise ComplexityEstimationError(
                f"{self.name}: hidden_states must be a tensor [tokens, dim] or "
                f"[batch, seq, dim], got {shape if shape is not None else type(hidden_states)}"
            )
        return tuple(hidden_states.shape[:-1])

    def _extra(
        self, kwargs: dict[str, Any], key: str, lead: tuple[int, ...], what: str
    ) -> torch.Tensor | None:
        """Fetch an optional context tensor whose leading dims must equal ``lead``."""
        value = kwargs.get(key)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or value.dim() != len(lead) + 1:
            raise ComplexityEstimationError(
                f"{self.name}: {key} must be a tensor {what}, got "
                f"{list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
            )
        if tuple(value.shape[:-1]) != lead:
            raise ComplexityEstimationError(
                f"{self.name}: {key} shape {list(value.shape)} does not match the tokens "
                f"{list(lead)} of hidden_states ({what})"
            )
        return value

    def _finish(self, scores: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        """Check shape and finiteness of fp32 scores; clamp to [0, 1] when normalising."""
        if tuple(scores.shape) != lead:
            raise ComplexityEstimationError(
                f"{self.name}: produced scores of shape {list(scores.shape)}, "
                f"expected {list(lead)} (one per token)"
            )
        scores = scores.float()
        if not bool(torch.isfinite(scores).all()):
            raise ComplexityEstimationError(
                f"{self.name}: produced non-finite complexity scores "
                "(check the inputs for NaN or inf)"
            )
        return scores.clamp(0.0, 1.0) if self.normalize else scores


class GradientNormEstimator(ComplexityEstimator):
    """Tokens with a large gradient (or hidden-state) norm are harder.

    norm_t = ||g_t||_2 with ``gradients`` [.., D] when given, else ||h_t||_2 [..].
    The batch's ``percentile``-th and ``(100 - percentile)``-th percentiles of the
    norms are tracked as running values (EMA with ``smoothing_factor``; the first
    batch sets them), and score_t = clamp((norm_t - low) / (high - low), 0, 1).
    Scaling between two percentiles spreads scores over [0, 1] even though norms of
    high-dimensional vectors concentrate around their mean (dividing by the high
    percentile alone would put nearly every score near 1).
    """

    stateful = True
    couples_tokens = True
    reads = ("gradients",)

    def __init__(
        self, percentile: float = 90.0, smoothing_factor: float = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not (
            50.0 < percentile <= 100.0
        ):
            raise RouterConfigurationError(
                f"percentile: must be in (50, 100], got {percentile!r}"
            )
        if isinstance(smoothing_factor, bool) or not isinstance(
            smoothing_factor, (int, float)
        ) or not (0.0 < smoothing_factor <= 1.0):
            raise RouterConfigurationError(
                f"smoothing_factor: must be in (0, 1], got {smoothing_factor!r}"
            )
        self.percentile = float(percentile)
        self.smoothing_factor = float(smoothing_factor)
        self._lock = threading.Lock()
        self.running_low: torch.Tensor | None = None
        self.running_high: torch.Tensor | None = None

    def input_problem(
        self, name: str, shape: tuple[int, ...], lead: tuple[int, ...], dim: int
    ) -> str | None:
        """``gradients`` must have the shape of hidden_states, [*lead, dim]."""
        expected = (*lead, dim)
        if shape != expected:
            return (
                f"gradients must have the shape of hidden_states {list(expected)}, "
                f"got {list(shape)}"
            )
        return None

    def reset(self) -> None:
        """Forget the running percentiles."""
        with self._lock:
            self.running_low = None
            self.running_high = None

    def estimate(
        self, hidden_states: torch.Tensor, update_running: bool = True, **kwargs: Any
    ) -> torch.Tensor:
        """Scores [B, S] from norms of ``gradients`` or ``hidden_states``.

        ``update_running=False`` scores without moving the running percentiles.
        """
        lead = self._lead_shape(hidden_states)
        grads = kwargs.get("gradients")
        if grads is not None and (
            not isinstance(grads, torch.Tensor) or grads.shape != hidden_states.shape
        ):
            got = list(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ComplexityEstimationError(
                f"{self.name}: gradients must have the shape of hidden_states "
                f"{list(hidden_states.shape)}, got {got}"
            )
        source = hidden_states if grads is None else grads
        norms = torch.linalg.vector_norm(source.float(), dim=-1)
        if not self.normalize:
            return self._finish(norms, lead)
        if norms.numel() == 0:
            return self._finish(norms, lead)
        q = torch.tensor(
            [1.0 - self.percentile / 100.0, self.percentile / 100.0],
            device=norms.device,
            dtype=norms.dtype,
        )
        batch_low, batch_high = torch.quantile(norms.reshape(-1), q).unbind()
        with self._lock:
            low, high = self.running_low, self.running_high
            if low is None or high is None or low.device != norms.device:
                low, high = batch_low, batch_high
            else:
                a = self.smoothing_factor
                low = (1.0 - a) * low + a * batch_low
                high = (1.0 - a) * high + a * batch_high
            if update_running:
                self.running_low, self.running_high = low.detach(), high.detach()
        scores = (norms - low) / (high - low).clamp(min=self.epsilon)
        return self._finish(scores, lead)


class AttentionEntropyEstimator(ComplexityEstimator):
    """Tokens whose attention is spread out are harder.

    Needs ``attention_weights`` [B, H, S, K] or [B, S, K] ([H, T, K] or [T, K] for
    [T, D] inputs). Per query and head: p = w^(1/temperature) renormalised over the
    K keys, entropy = -sum p log p, divided by log K (uniform attention -> 1,
    one-hot -> 0); heads are then combined by ``head_aggregation`` (mean|max|min).
    """

    reads = ("attention_weights",)
    requires = ("attention_weights",)

    def __init__(
        self,
        head_aggregation: HeadAggregation | str = "mean",
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.head_aggregation: HeadAggregation = _choice(
            HeadAggregation, head_aggregation, "head_aggregation"
        )
        self.temperature = _positive_float(temperature, "temperature")

    def input_problem(
        self, name: str, shape: tuple[int, ...], lead: tuple[int, ...], dim: int
    ) -> str | None:
        """[*batch, heads, seq, keys] or [*batch, seq, keys] for hidden [*batch, seq, dim],
        with at least one head and one key."""
        batch, seq = lead[:-1], lead[-1]
        expected = (
            f"[{', '.join(map(str, batch)) + ', ' if batch else ''}heads, {seq}, keys] or "
            f"[{', '.join(map(str, batch)) + ', ' if batch else ''}{seq}, keys]"
        )
        rank_ok = len(shape) in (len(lead) + 1, len(lead) + 2)
        if not rank_ok or shape[: len(batch)] != batch or shape[-2] != seq:
            return f"attention_weights must be {expected}, got {list(shape)}"
        if 0 in shape[len(batch) :]:
            return f"attention_weights needs at least one head and one key, got {list(shape)}"
        return None

    def value_problem(self, name: str, values: torch.Tensor) -> str | None:
        """Attention weights are non-negative."""
        negative = int((values < 0).sum())
        if negative:
            return f"attention_weights has {negative} negative values; expected probabilities"
        return None

    def estimate(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Scores [B, S] from ``attention_weights`` (required)."""
        lead = self._lead_shape(hidden_states)
        attn = kwargs.get("attention_weights")
        if attn is None:
            raise ComplexityEstimationError(
                f"{self.name}: needs attention_weights ([batch, heads, seq, keys] or "
                "[batch, seq, keys]) passed as a keyword argument"
            )
        batch_dims = lead[:-1]
        seq = lead[-1]
        if not isinstance(attn, torch.Tensor) or attn.dim() not in (
            len(lead) + 1,
            len(lead) + 2,
        ):
            got = list(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise ComplexityEstimationError(
                f"{self.name}: attention_weights must be [batch, heads, seq, keys] or "
                f"[batch, seq, keys] for hidden_states {list(hidden_states.shape)}, got {got}"
            )
        with_heads = attn.dim() == len(lead) + 2
        query_dim = -2
        if tuple(attn.shape[: len(batch_dims)]) != batch_dims or attn.shape[query_dim] != seq:
            raise ComplexityEstimationError(
                f"{self.name}: attention_weights shape {list(attn.shape)} does not match "
                f"the tokens {list(lead)} of hidden_states"
            )
        w = attn.float()
        if bool((w < 0).any()):
            raise ComplexityEstimationError(
                f"{self.name}: attention_weights must be non-negative probabilities"
            )
        if self.temperature != 1.0:
            w = w.pow(1.0 / self.temperature)
        p = w / w.sum(dim=-1, keepdim=True).clamp(min=self.epsilon)
        entropy = _normalised_entropy(p, self.normalize)  # [..., (H,) S]
        if with_heads:
            head_dim = len(batch_dims)
            if self.head_aggregation is HeadAggregation.MEAN:
                entropy = entropy.mean(dim=head_dim)
            elif self.head_aggregation is HeadAggregation.MAX:
                entropy = entropy.amax(dim=head_dim)
            else:
                entropy = entropy.amin(dim=head_dim)
        return self._finish(entropy, lead)


class PerplexityProxyEstimator(ComplexityEstimator):
    """Tokens the model is unsure about are harder.

    With ``logits`` [B, S, V] (the LM's next-token logits): H / log V, where H is the
    entropy of softmax(logits / temperature). Otherwise the router's own uncertainty
    from ``router_logits`` [B, S, E] (the dynamic router passes them): the router's
    perplexity exp(H), i.e. its effective number of experts, mapped to
    (exp(H) - 1) / (E - 1) (one-hot -> 0, uniform -> 1). Over a handful of experts
    H / log E crowds near 1 for any router that is not sharp (a freshly initialised
    gate gives ~0.93 and every token the maximum k); the perplexity scale keeps the
    spread. ``normalize=False`` returns H in nats for both.
    """

    reads = ("logits",)

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = _positive_float(temperature, "temperature")

    def input_problem(
        self, name: str, shape: tuple[int, ...], lead: tuple[int, ...], dim: int
    ) -> str | None:
        """``logits`` are [*lead, vocab] with a vocabulary of at least one."""
        if len(shape) != len(lead) + 1 or shape[:-1] != lead or shape[-1] < 1:
            return f"logits must be [{', '.join(map(str, lead))}, vocab], got {list(shape)}"
        return None

    def estimate(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Scores [B, S] from ``logits`` (preferred) or ``router_logits``."""
        lead = self._lead_shape(hidden_states)
        logits = self._extra(kwargs, "logits", lead, "[batch, seq, vocab]")
        if logits is not None:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            return self._finish(_normalised_entropy(probs, self.normalize), lead)
        router_logits = self._extra(kwargs, "router_logits", lead, "[batch, seq, experts]")
        if router_logits is None:
            raise ComplexityEstimationError(
                f"{self.name}: needs logits ([batch, seq, vocab]) or router_logits "
                "([batch, seq, experts]) passed as a keyword argument"
            )
        probs = torch.softmax(router_logits.float() / self.temperature, dim=-1)
        entropy = _normalised_entropy(probs, normalize=False)
        num_experts = probs.shape[-1]
        if not self.normalize:
            return self._finish(entropy, lead)
        if num_experts == 1:
            return self._finish(torch.zeros_like(entropy), lead)
        return self._finish((entropy.exp() - 1.0) / (num_experts - 1), lead)


class ThresholdEstimator(ComplexityEstimator):
    """A simple, deterministic estimator (for tests and baselines).

    ``threshold_fn(hidden_states) -> scores [B, S]`` when given. The default scores a
    token by the fraction of its features farther than one standard deviation from
    the token's mean: |x_d - mean(x)| > std(x) (population std). About 0.32 for
    Gaussian features, lower for a token dominated by a few outliers, 0 for a
    constant token.
    """

    reads = ()

    def __init__(
        self,
        threshold_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if threshold_fn is not None and not callable(threshold_fn):
            raise RouterConfigurationError(
                f"threshold_fn: must be a callable or None, got {type(threshold_fn).__name__}"
            )
        self.threshold_fn = threshold_fn

    def estimate(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Scores [B, S] from ``threshold_fn`` or the outlier-fraction default."""
        lead = self._lead_shape(hidden_states)
        if self.threshold_fn is not None:
            scores = self.threshold_fn(hidden_states)
            if not isinstance(scores, torch.Tensor):
                raise ComplexityEstimationError(
                    f"{self.name}: threshold_fn must return a tensor, "
                    f"got {type(scores).__name__}"
                )
            return self._finish(scores, lead)
        x = hidden_states.float()
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, correction=0)
        fraction = ((x - mean).abs() > std).float().mean(dim=-1)
        return self._finish(fraction, lead)


_ESTIMATORS: dict[EstimatorName, type[ComplexityEstimator]] = {
    EstimatorName.GRADIENT_NORM: GradientNormEstimator,
    EstimatorName.ATTENTION_ENTROPY: AttentionEntropyEstimator,
    EstimatorName.PERPLEXITY_PROXY: PerplexityProxyEstimator,
    EstimatorName.THRESHOLD: ThresholdEstimator,
}


def get_estimator(
    name_or_instance: str | EstimatorName | ComplexityEstimator, **kwargs: Any
) -> ComplexityEstimator:
    """Build a built-in estimator by name with ``kwargs``, or pass an instance through."""
    if isinstance(name_or_instance, ComplexityEstimator):
        if kwargs:
            raise RouterConfigurationError(
                f"complexity_estimator: arguments {sorted(kwargs)} cannot be applied to an "
                "estimator instance; pass a name or configure the instance"
            )
        return name_or_instance
    name: EstimatorName = _choice(EstimatorName, name_or_instance, "complexity_estimator")
    try:
        return _ESTIMATORS[name](**kwargs)
    except TypeError as exc:
        raise RouterConfigurationError(
            f"complexity_estimator {name.value!r}: unexpected arguments {sorted(kwargs)} ({exc})"
        ) from exc
