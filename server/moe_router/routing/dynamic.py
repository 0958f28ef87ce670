"""DynamicRouter and AdaptiveRouter: a per-token number of experts in [min, max].

The number of experts k_t comes from a complexity estimator (``top_k`` strategy) or
from the router's own confidence (``threshold`` strategy, Huang et al. 2024,
"Harder Tasks Need More Experts: Dynamic Routing in MoE Models"). Selection is
vectorised: one sort per call, a mask of the first k_t slots per token.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase
from moe_router.routing.estimators import ComplexityEstimator, EstimatorName, get_estimator
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig, RoutingMethod, ScoringFunction

__all__ = ["RoutingStrategy", "DynamicRouter", "AdaptiveRouter", "threshold_counts"]

_USAGE_KEYS = (
    "total_batches",
    "avg_usage_per_expert",
    "usage_variance",
    "most_used_expert",
    "least_used_expert",
    "load_balance_score",
)


class RoutingStrategy(str, Enum):
    """How a dynamic router picks k per token: from complexity, or from cumulative probability."""

    TOP_K = "top_k"
    THRESHOLD = "threshold"


def _count(value: object, name: str, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterConfigurationError(f"{name}: must be an integer {allowed}, got {value!r}")
    return value


def _unit_interval(value: object, name: str, allowed: str, low_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0.0 < value if low_open else 0.0 <= value) and value <= 1.0  # type: ignore[operator]
    if not ok:
        raise RouterConfigurationError(f"{name}: must be in {allowed}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def threshold_counts(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Experts per token [T] int64 for probabilities [T, E]: the smallest number of the
    most probable experts whose cumulative probability exceeds ``top_p``.

    k_t = 1 + #{j : cumsum_j(sorted desc probs_t) <= top_p}, at most E.
    """
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    below = (sorted_probs.cumsum(dim=-1) <= top_p).sum(dim=-1)
    return (below + 1).clamp(max=probs.shape[-1])


class DynamicRouter(RouterBase):
    """Route each token to between ``min_experts`` and ``max_experts`` experts.

    probs  = softmax(logits + noise_factor * N(0, 1))                     [T, E] fp32
    k_t    = min + round(c_t * (max - min))         (``top_k``, c_t complexity in [0, 1])
           | clamp(threshold_counts(probs, top_p), min, max)             (``threshold``)
    chosen = the k_t best experts by probs + expert_bias                 [T, max], -1 padded
    weights = probs of the chosen experts, renormalised over the chosen set

    ``max_experts=None`` means ``num_experts // 2`` (at least ``min_experts``).
    With ``load_balancing`` (auxiliary-loss-free balancing, DeepSeek-V3, Wang et al.
    2024) a bias ``expert_bias`` [E] shifts the *selection* only; after every call
    bias += bias_update_rate * sign(mean_load - load), so overloaded experts are
    picked less. Noise (``noise_factor`` > 0) is drawn on every call, in training and
    eval alike, from ``generator`` when one is given.
    """

    routing_method = RoutingMethod.DYNAMIC
    expert_bias: torch.Tensor

    accepts_estimator_inputs = True

    def __init__(
        self,
        input_dim: int,
        num_experts: int,
        min_experts: int = 1,
        max_experts: int | None = None,
        complexity_estimator: str | EstimatorName | ComplexityEstimator = "gradient_norm",
        routing_strategy: str | RoutingStrategy = "top_k",
        load_balancing: bool = True,
        noise_factor: float = 0.0,
        *,
        top_p: float = 0.4,
        bias_update_rate: float = 1e-3,
        **estimator_kwargs: Any,
    ) -> None:
        _count(input_dim, "input_dim", ">= 1")
        _count(num_experts, "num_experts", ">= 1")
        _count(min_experts, "min_experts", f"in [1, num_experts={num_experts}]")
        if min_experts > num_experts:
            raise RouterConfigurationError(
                f"min_experts: must be in [1, num_experts={num_experts}], got {min_experts}"
            )
        if max_experts is None:
            max_experts = max(min_experts, num_experts // 2)
        allowed_max = f"in [min_experts={min_experts}, num_experts={num_experts}] or None"
        _count(max_experts, "max_experts", allowed_max)
        if not min_experts <= max_experts <= num_experts:
            raise RouterConfigurationError(f"max_experts: must be {allowed_max}, got {max_experts}")
        try:
            strategy = RoutingStrategy(routing_strategy)
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in RoutingStrategy)
            raise RouterConfigurationError(
                f"routing_strategy: must be one of {allowed}, got {routing_strategy!r}"
            ) from None
        if not isinstance(load_balancing, bool):
            raise RouterConfigurationError(
                f"load_balancing: must be True or False, got {load_balancing!r}"
            )
        noise = _unit_interval(noise_factor, "noise_factor", "[0, 1]", low_open=False)
        top_p = _unit_interval(top_p, "top_p", "(0, 1]", low_open=True)
        if isinstance(bias_update_rate, bool) or not isinstance(
            bias_update_rate, (int, float)
        ) or not (math.isfinite(bias_update_rate) and bias_update_rate >= 0):
            raise RouterConfigurationError(
                f"bias_update_rate: must be a finite number >= 0, got {bias_update_rate!r}"
            )
        estimator = get_estimator(complexity_estimator, **estimator_kwargs)
        config = RouterConfig(
            hidden_size=input_dim,
            num_experts=num_experts,
            top_k=max_experts,
            routing_method=self.routing_method,
            scoring=ScoringFunction.SOFTMAX,
            renormalize=True,
        )
        super().__init__(config)
        self.min_experts = min_experts
        self.max_experts = max_experts
        self.routing_strategy = strategy
        self.load_balancing = load_balancing
        self.noise_factor = noise
        self.top_p = top_p
        self.bias_update_rate = float(bias_update_rate)
        self.estimator = estimator
        # Batch-relative estimators and the per-call bias update both make a token's
        # answer depend on the other tokens routed with it: calls must not be merged.
        self.couples_tokens = estimator.couples_tokens or load_balancing  # type: ignore[misc]
        self._bias_lock = threading.Lock()
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    # ----------------------------------------------------------------- description
    @property
    def k_range(self) -> tuple[int, int]:
        """(min_experts, max_experts)."""
        return (self.min_experts, self.max_experts)

    @property
    def stateful(self) -> bool:
        """True with load balancing (the bias moves) or a running-statistics estimator."""
        return self.load_balancing or self.estimator.stateful

    @property
    def stochastic(self) -> bool:
        """True when routing noise is drawn (``noise_factor`` > 0)."""
        return self.noise_factor > 0 or super().stochastic

    @property
    def required_estimator_inputs(self) -> tuple[str, ...]:
        """The estimator's required inputs (``attention_weights`` for attention_entropy)."""
        return self.estimator.requires

    def check_estimator_inputs(
        self, lead: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]], who: str
    ) -> None:
        """The estimator's contract (``reads``, ``requires``, ``input_problem``), checked
        before the call runs so that a wrong input is the caller's error."""
        estimator = self.estimator
        reads = estimator.reads
        if reads is None:  # a custom estimator checks its inputs itself
            return
        named = f"{who} ({estimator.name})"
        for name in sorted(shapes):
            if name not in reads:
                uses = ", ".join(reads) if reads else "no estimator inputs"
                raise ValidationError(f"{named} does not read {name}; it reads {uses}")
        for name in estimator.requires:
            if name not in shapes:
                raise ValidationError(f"{named} needs {name}; the request has none")
        for name, shape in sorted(shapes.items()):
            problem = estimator.input_problem(name, shape, lead, self.hidden_size)
            if problem is not None:
                raise ValidationError(f"{named}: {problem}")

    def estimator_value_problem(self, name: str, values: torch.Tensor) -> str | None:
        """The estimator's check of input values (e.g. negative attention weights)."""
        return self.estimator.value_problem(name, values)

    def complexity_offset(self) -> torch.Tensor | float:
        """Added to complexity (``top_k``) or to ``top_p`` (``threshold``); 0 here."""
        return 0.0

    # ----------------------------------------------------------------- selection
    def select(  # type: ignore[override]  # positional-only, see the docstring
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Pick k_t experts per token from logits [T, E]; complexity goes in the extras.

        ``logits`` and ``hidden_states`` are positional-only so that an estimator's
        ``logits=`` keyword (LM logits) reaches ``kwargs`` instead of colliding.
        """
        lead = tuple(kwargs.pop("lead_shape", None) or (hidden_states.shape[0],))
        probs = torch.softmax(logits.float(), dim=-1)
        noisy = probs
        if self.noise_factor > 0:
            noise = torch.randn(
                logits.shape, generator=generator, device=logits.device, dtype=torch.float32
            )
            noisy = torch.softmax(logits.float() + self.noise_factor * noise, dim=-1)
        complexity = self._complexity(logits, hidden_states, lead, True, kwargs)
        k = self._k_per_token(complexity, noisy)
        ranking = noisy + self.expert_bias if self.load_balancing else noisy
        order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices
        order = order[:, : self.max_experts]
        slots = torch.arange(self.max_experts, device=logits.device)
        keep = slots.unsqueeze(0) < k.unsqueeze(1)
        chosen = noisy.gather(-1, order)
        weights = F.renormalize(torch.where(keep, chosen, torch.zeros_like(chosen)))
        indices = torch.where(keep, order, torch.full_like(order, -1))
        if self.load_balancing:
            self._update_bias(indices)
        info = {
            "strategy": self.routing_strategy.value,
            "complexity_estimator": self.estimator.name,
        }
        return Selection(indices, weights, probs, {"complexity_scores": complexity, "info": info})

    def _complexity(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        lead: tuple[int, ...],
        update: bool,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Complexity [T] fp32 from the estimator, given the shaped inputs and extras."""
        shaped = hidden_states.reshape(*lead, hidden_states.shape[-1])
        extra = dict(kwargs)
        extra["router_logits"] = logits.reshape(*lead, logits.shape[-1])
        if not update:
            extra["update_running"] = False
        return self.estimator.estimate(shaped, **extra).float().reshape(-1)

    def _k_per_token(self, complexity: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Experts per token [T] int64 in [min_experts, max_experts]."""
        offset = self.complexity_offset()
        if self.routing_strategy is RoutingStrategy.TOP_K:
            c = (complexity + offset).clamp(0.0, 1.0)
            k = self.min_experts + torch.round(c * (self.max_experts - self.min_experts))
            k = k.long()
        else:
            top_p = torch.as_tensor(self.top_p + offset, device=probs.device).clamp(1e-6, 1.0)
            k = threshold_counts(probs, top_p)
        return k.clamp(self.min_experts, self.max_experts)

    def _update_bias(self, indices: torch.Tensor) -> None:
        """bias += rate * sign(mean_load - load) from this call's selection [T, k]."""
        with torch.no_grad(), self._bias_lock:
            load = F.tokens_per_expert(indices, self.num_experts).float()
            step = torch.sign(load.mean() - load) * self.bias_update_rate
            self.expert_bias += step.to(self.expert_bias.device)

    def compute_aux_loss(
        self, router_logits_or_probs: torch.Tensor, expert_indices: torch.Tensor
    ) -> torch.Tensor:
        """Switch loss E * sum_i f_i * P_i with f_i the share of this call's assignments
        (k varies per token, so f is normalised by the assignments actually made)."""
        probs = router_logits_or_probs.float()
        if probs.shape[0] == 0:
            return probs.new_zeros(())
        counts = F.tokens_per_expert(expert_indices, self.num_experts).float()
        fraction = counts / counts.sum().clamp(min=1.0)
        return self.num_experts * torch.sum(fraction * probs.mean(dim=0))

    # ----------------------------------------------------------------- seed API
    @torch.no_grad()
    def predict_k(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Experts per token [B, S] (or [T]) int32 the router would use, without noise
        and without moving any statistic, bias or running estimate."""
        flat, lead = self.validate(x)
        logits = self.compute_router_logits(flat)
        complexity = self._complexity(logits, flat, lead, False, kwargs)
        probs = torch.softmax(logits, dim=-1)
        return self._k_per_token(complexity, probs).to(torch.int32).reshape(lead)

    def route(
        self, hidden_states: torch.Tensor, return_router_logits: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """Route [B, S, D] (or [T, D]) and answer with the seed's dictionary.

        Keys: expert_indices [B, S, max] int32 (-1 padded), expert_weights [B, S, max],
        num_experts_per_token [B, S], complexity_scores [B, S], routing_info, and
        router_logits [B, S, E] only when ``return_router_logits``. ``kwargs`` go to
        :meth:`forward` (``generator``, ``attention_weights``, ``logits``, ``gradients``).
        """
        out = self(hidden_states, **kwargs)
        per_token = out.num_experts_per_token
        avg_k = float(per_token.float().mean()) if per_token.numel() else 0.0
        routing_info = {
            "aux_loss": out.aux_loss,
            "z_loss": out.z_loss,
            "tokens_per_expert": out.tokens_per_expert,
            "dropped_tokens": out.dropped_tokens,
            "avg_experts_per_token": avg_k,
            "flop_reduction": 1.0 - avg_k / self.max_experts if avg_k else 0.0,
            "k_range": self.k_range,
            **out.info,
        }
        result: dict[str, Any] = {
            "expert_indices": out.expert_indices,
            "expert_weights": out.expert_weights,
            "num_experts_per_token": out.num_experts_per_token,
            "complexity_scores": out.complexity_scores,
            "routing_info": routing_info,
        }
        if return_router_logits:
            result["router_logits"] = out.router_logits
        return result

    def get_expert_usage_stats(self) -> dict[str, Any]:
        """The seed's usage summary: total_batches, avg_usage_per_expert, usage_variance,
        most_used_expert, least_used_expert, load_balance_score (Jain's index, 0-1]."""
        stats = self.get_stats()
        return {key: stats[key] for key in _USAGE_KEYS}

    def reset_expert_bias(self) -> None:
        """Set the load-balancing bias back to zero."""
        with torch.no_grad(), self._bias_lock:
            self.expert_bias.zero_()


class AdaptiveRouter(DynamicRouter):
    """A DynamicRouter whose complexity thresholds follow performance feedback.

    It keeps an offset o in [-1, 1] (buffer ``complexity_offset_``, starts at 0):
    ``top_k`` uses c_t + o (clamped to [0, 1]) as complexity, ``threshold`` uses
    top_p + o (clamped to (0, 1]). ``update_thresholds(score)`` does
    o <- clamp(o - adaptation_rate * (score - target_performance), -1, 1):
    a score above target moves towards fewer experts, below target towards more.
    """

    routing_method = RoutingMethod.ADAPTIVE
    complexity_offset_: torch.Tensor

    def __init__(
        self, adaptation_rate: float = 0.01, target_performance: float = 0.5, **kwargs: Any
    ) -> None:
        rate_ok = isinstance(adaptation_rate, (int, float)) and not isinstance(
            adaptation_rate, bool
        )
        if not (rate_ok and math.isfinite(adaptation_rate) and adaptation_rate > 0):
            raise RouterConfigurationError(
                f"adaptation_rate: must be a finite number > 0, got {adaptation_rate!r}"
            )
        target_ok = isinstance(target_performance, (int, float)) and not isinstance(
            target_performance, bool
        )
        if not (target_ok and math.isfinite(target_performance)):
            raise RouterConfigurationError(
                f"target_performance: must be a finite number, got {target_performance!r}"
            )
        super().__init__(**kwargs)
        self.adaptation_rate = float(adaptation_rate)
        self.target_performance = float(target_performance)
        self._offset_lock = threading.Lock()
        self.register_buffer("complexity_offset_", torch.zeros((), dtype=torch.float32))

    @property
    def min_k(self) -> int:
        """Fewest experts a token gets (``min_experts``)."""
        return self.min_experts

    @property
    def max_k(self) -> int:
        """Most experts a token gets (``max_experts``)."""
        return self.max_experts

    @property
    def stateful(self) -> bool:
        """Always True: the thresholds move with feedback."""
        return True

    def complexity_offset(self) -> torch.Tensor:
        """The current offset o (0-dim fp32)."""
        return self.complexity_offset_

    def update_thresholds(self, performance_score: float) -> None:
        """Move the offset by -adaptation_rate * (performance_score - target_performance)."""
        ok = isinstance(performance_score, (int, float)) and not isinstance(
            performance_score, bool
        )
        if not (ok and math.isfinite(performance_score)):
            raise ValidationError(
                f"performance_score: must be a finite number, got {performance_score!r}"
            )
        step = self.adaptation_rate * (float(performance_score) - self.target_performance)
        with torch.no_grad(), self._offset_lock:
            self.complexity_offset_.sub_(step).clamp_(-1.0, 1.0)
