"""The seed's MoE layers: a router plus real experts, for in-process use and measurement.

``MoELayer``       y = sum_j w_j * expert_{e_j}(x)           (no residual)
``SparseMoELayer`` the same with a per-expert capacity; tokens whose every assignment
                   was dropped pass through unchanged (y = x)
``LayerNormMoE``   y = x + MoE(LayerNorm(x))                 (pre-norm residual block)

Experts run grouped by expert (:func:`moe_router.layers.dispatch.run_experts_grouped`).
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.layers.dispatch import run_experts_grouped
from moe_router.routing.base import FLOAT_DTYPES, RouterBase
from moe_router.routing.capacity import apply_capacity, expert_capacity
from moe_router.routing.output import RouterOutput
from moe_router.routing.router_config import DropPolicy

__all__ = ["MoELayer", "SparseMoELayer", "LayerNormMoE"]


def _make_expert(expert_fn: Callable[..., Any], use_bias: bool) -> nn.Module:
    """Call ``expert_fn``, passing ``use_bias`` only if its signature names that parameter."""
    try:
        parameters = inspect.signature(expert_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        parameters = {}  # type: ignore[assignment]
    expert = expert_fn(use_bias=use_bias) if "use_bias" in parameters else expert_fn()
    if not isinstance(expert, nn.Module):
        raise RouterConfigurationError(
            f"expert_fn: must return an nn.Module, got {type(expert).__name__}"
        )
    return expert


class MoELayer(nn.Module):
    """A Mixture-of-Experts layer: route each token, run its experts, sum weighted outputs.

    router: a :class:`RouterBase` over ``num_experts`` experts (static or variable k).
    expert_fn: builds one expert, an ``nn.Module`` mapping [N, D] -> [N, D]; called
        ``num_experts`` times. If its signature has a ``use_bias`` parameter it is called
        as ``expert_fn(use_bias=use_bias)``, otherwise with no arguments.
    expert_capacity_factor: sizes the per-expert buffer ``ceil(T * k_max / E * factor)``
        that a static dispatch would allocate. This layer never drops: it reports the
        capacity and how many assignments would overflow it (``routing_info``);
        :class:`SparseMoELayer` enforces it.
    dropout_rate: dropout on the combined expert output (active in training mode).
    use_bias: passed to ``expert_fn`` as above.

    Tokens with no assignment at all (possible when the router drops by capacity)
    get a zero output here.
    """

    def __init__(
        self,
        router: RouterBase,
        expert_fn: Callable[..., nn.Module],
        num_experts: int,
        expert_capacity_factor: float = 1.25,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(router, RouterBase):
            raise RouterConfigurationError(
                f"router: must be a moe_router RouterBase, got {type(router).__name__}"
            )
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise RouterConfigurationError(
                f"num_experts: must be a positive integer, got {num_experts!r}"
            )
        if num_experts != router.num_experts:
            raise RouterConfigurationError(
                f"num_experts: must equal the router's num_experts ({router.num_experts}), "
                f"got {num_experts}"
            )
        if not (isinstance(expert_capacity_factor, (int, float))
                and math.isfinite(expert_capacity_factor) and expert_capacity_factor > 0):
            raise RouterConfigurationError(
                f"expert_capacity_factor: must be a finite number > 0, "
                f"got {expert_capacity_factor!r}"
            )
        if not (isinstance(dropout_rate, (int, float)) and 0.0 <= dropout_rate < 1.0):
            raise RouterConfigurationError(
                f"dropout_rate: must be in [0, 1), got {dropout_rate!r}"
            )
        if not callable(expert_fn):
            raise RouterConfigurationError(
                f"expert_fn: must be a callable returning an nn.Module, got {expert_fn!r}"
            )
        self.router = router
        self.num_experts = num_experts
        self.expert_capacity_factor = float(expert_capacity_factor)
        self.dropout_rate = float(dropout_rate)
        self.use_bias = bool(use_bias)
        self.experts = nn.ModuleList(_make_expert(expert_fn, self.use_bias)
                                     for _ in range(num_experts))
        self.norm: nn.Module = nn.Identity()
        self.dropout = nn.Dropout(self.dropout_rate)
        self._stats_lock = threading.Lock()
        self.reset_performance_stats()

    @property
    def hidden_size(self) -> int:
        """Token dimension D the layer takes and returns."""
        return self.router.hidden_size

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        return_router_logits: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Route and run experts on ``hidden_states`` [B, S, D] or [T, D].

        Returns the output in the input's shape, or ``(output, routing_info)`` when
        ``return_router_logits`` is true. ``routing_info`` holds every RouterOutput field
        (``expert_indices`` / ``expert_weights`` / ``num_experts_per_token`` /
        ``tokens_per_expert`` as the experts actually ran, after any layer capacity) and
        the counts ``num_tokens``, ``num_assignments``, ``active_experts``,
        ``expert_capacity``, ``capacity_overflow`` and ``capacity_dropped``.
        ``kwargs`` go to the router (estimator inputs such as ``attention_weights``).
        """
        self._check_input(hidden_states)
        lead = tuple(hidden_states.shape[:-1])
        moe_input = self.norm(hidden_states)
        routing: RouterOutput = self.router(moe_input, **kwargs)
        flat = moe_input.reshape(-1, self.hidden_size)
        num_tokens = flat.shape[0]
        indices = routing.expert_indices.reshape(num_tokens, -1)
        weights = routing.expert_weights.reshape(num_tokens, -1)
        capacity = expert_capacity(
            num_tokens, self.router.k_range[1], self.num_experts, self.expert_capacity_factor
        )
        indices, weights, capacity_dropped = self.apply_capacity(indices, weights, capacity)
        combined, counts = run_experts_grouped(flat, indices, weights, self.experts)
        output = self.add_residual(hidden_states.reshape(-1, self.hidden_size),
                                   self.dropout(combined), indices)

        assignments = int(counts.sum())
        active = int((counts > 0).sum())
        self._record(num_tokens, assignments, active)
        output = output.reshape(hidden_states.shape)
        if not return_router_logits:
            return output
        info: dict[str, Any] = {f.name: getattr(routing, f.name) for f in fields(RouterOutput)}
        info.update(
            expert_indices=indices.reshape(*lead, -1),
            expert_weights=weights.reshape(*lead, -1),
            num_experts_per_token=(indices >= 0).sum(dim=-1).to(torch.int32).reshape(lead),
            tokens_per_expert=counts,
            dropped_tokens=routing.dropped_tokens + capacity_dropped,
            capacity_dropped=capacity_dropped,
            num_tokens=num_tokens,
            num_assignments=assignments,
            active_experts=active,
            expert_capacity=capacity,
            capacity_overflow=int((counts - capacity).clamp(min=0).sum()),
        )
        return output, info

    def apply_capacity(
        self, indices: torch.Tensor, weights: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Hook: drop assignments over ``capacity``; the plain layer keeps them all."""
        return indices, weights, 0

    def add_residual(
        self, hidden_states: torch.Tensor, moe_output: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """Hook: combine the flat input [T, D] and expert output [T, D]; plain layer: output."""
        return moe_output

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        if not isinstance(hidden_states, torch.Tensor):
            raise ValidationError(
                f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}"
            )
        if hidden_states.dtype not in FLOAT_DTYPES:
            raise ValidationError(
                f"hidden_states dtype {hidden_states.dtype} is not accepted; "
                "expected float32, float16 or bfloat16"
            )
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != self.hidden_size:
            raise ValidationError(
                f"hidden_states must be [tokens, {self.hidden_size}] or "
                f"[batch, seq, {self.hidden_size}], got shape {list(hidden_states.shape)}"
            )

    # ----------------------------------------------------------------- statistics
    def _record(self, num_tokens: int, assignments: int, expert_calls: int) -> None:
        with self._stats_lock:
            self._forward_calls += 1
            self._expert_calls += expert_calls
            self._tokens += num_tokens
            self._assignments += assignments

    def reset_performance_stats(self) -> None:
        """Forget the counters behind :meth:`get_performance_summary`."""
        with self._stats_lock:
            self._forward_calls = 0
            self._expert_calls = 0
            self._tokens = 0
            self._assignments = 0

    def get_performance_summary(self) -> dict[str, Any]:
        """Counters since construction (or the last reset).

        total_forward_calls: forward passes.
        total_expert_calls: expert module invocations (one per expert with tokens per pass).
        avg_experts_per_forward: total_expert_calls / total_forward_calls.
        computational_efficiency: expert FLOPs used / FLOPs of a static top-k_max MoE,
            i.e. assignments / (tokens * k_max) over all calls, k_max = router.k_range[1]
            (1.0 for static top-k without drops; 0.0 before the first call).
        router_stats: ``router.get_stats()``.
        """
        k_max = self.router.k_range[1]
        with self._stats_lock:
            calls, expert_calls = self._forward_calls, self._expert_calls
            tokens, assignments = self._tokens, self._assignments
        return {
            "total_forward_calls": calls,
            "total_expert_calls": expert_calls,
            "avg_experts_per_forward": expert_calls / calls if calls else 0.0,
            "computational_efficiency": assignments / (tokens * k_max) if tokens else 0.0,
            "router_stats": self.router.get_stats(),
        }


class SparseMoELayer(MoELayer):
    """MoELayer that enforces a per-expert capacity ``ceil(T * k_max / E * capacity_factor)``.

    Each expert keeps its highest-weight assignments (ties: earlier token) and drops the
    rest. A partly dropped token keeps the weighted sum of its surviving experts (weights
    are not renormalised, as in Switch/GShard). A token left with no expert, by this
    capacity or the router's own, passes through unchanged: its output row equals its
    input row. ``capacity_factor`` replaces MoELayer's ``expert_capacity_factor``;
    other keyword arguments go to :class:`MoELayer`.
    """

    def __init__(self, capacity_factor: float = 1.25, **kwargs: Any) -> None:
        if "expert_capacity_factor" in kwargs:
            raise RouterConfigurationError(
                "expert_capacity_factor: SparseMoELayer takes capacity_factor instead"
            )
        super().__init__(expert_capacity_factor=capacity_factor, **kwargs)
        self.capacity_factor = self.expert_capacity_factor

    def apply_capacity(
        self, indices: torch.Tensor, weights: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Drop each expert's lowest-weight assignments beyond ``capacity``; count them."""
        valid = indices >= 0
        kept_indices, kept_weights, dropped = apply_capacity(
            indices.long(), weights, capacity, DropPolicy.PROBS, num_experts=self.num_experts
        )[:3]
        fully_dropped = int(((kept_indices < 0).all(dim=-1) & valid.any(dim=-1)).sum())
        with self._stats_lock:
            self._dropped_assignments += dropped
            self._dropped_tokens += fully_dropped
        return kept_indices, kept_weights, dropped

    def add_residual(
        self, hidden_states: torch.Tensor, moe_output: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """Tokens with no surviving assignment take their input row; others the MoE output."""
        no_expert = (indices < 0).all(dim=-1, keepdim=True)
        return torch.where(no_expert, hidden_states.to(moe_output.dtype), moe_output)

    def reset_performance_stats(self) -> None:
        """Forget the performance and capacity counters."""
        super().reset_performance_stats()
        with self._stats_lock:
            self._dropped_assignments = 0
            self._dropped_tokens = 0

    def get_capacity_stats(self) -> dict[str, int]:
        """Assignments dropped by this layer's capacity, and tokens it left with no expert."""
        with self._stats_lock:
            return {
                "dropped_assignments": self._dropped_assignments,
                "fully_dropped_tokens": self._dropped_tokens,
            }


class LayerNormMoE(MoELayer):
    """Pre-norm residual MoE block: ``y = x + dropout(MoE(LayerNorm(x)))``.

    The router and the experts both see the normalised tokens. ``layer_norm_eps`` is the
    LayerNorm epsilon; other keyword arguments go to :class:`MoELayer`.
    """

    def __init__(self, layer_norm_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(layer_norm_eps, (int, float)) and layer_norm_eps > 0):
            raise RouterConfigurationError(
                f"layer_norm_eps: must be a number > 0, got {layer_norm_eps!r}"
            )
        self.layer_norm_eps = float(layer_norm_eps)
        self.norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)

    def add_residual(
        self, hidden_states: torch.Tensor, moe_output: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """The residual connection: input plus the MoE output."""
        return hidden_states + moe_output.to(hidden_states.dtype)
