"""The one interface every chain stage implements, and the values that cross it.

A door decodes its protocol into a :class:`RouteCall`, calls the outermost stage of the
router's chain (see :mod:`moe_router.chain`), and encodes the :class:`RouteResult`.
Each stage reports its own figures as a frozen dataclass from ``stats()``; nothing
crosses the chain as a string-keyed dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from moe_router.routing.output import RouterOutput

__all__ = ["RouteOptions", "RouteCall", "RouteResult", "Backend"]


@dataclass(frozen=True)
class RouteOptions:
    """Per-call options that can change the answer (all belong in a cache key).

    extra_inputs: estimator tensors by name (``attention_weights``, ``logits``,
    ``gradients``), host tensors.
    input_ids: the tokens' ids (int32/int64, hidden_states' leading dims) for hash
    routers, a host tensor; None for every other router.
    return_losses: compute the call's aux and z losses (serving rarely reads them, so
    they cost nothing unless asked).
    """

    return_router_logits: bool = False
    return_losses: bool = False
    skip_cache: bool = False
    seed: int | None = None
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class RouteCall:
    """A decoded Route request: hidden states [T, D] or [B, S, D] as a host tensor.

    deadline: absolute ``time.monotonic()`` after which the answer is useless, or None.
    peer: the caller's identity for rate limiting (API key id or peer address).
    """

    router: str
    layer: int
    hidden_states: torch.Tensor
    options: RouteOptions = RouteOptions()
    deadline: float | None = None
    request_id: str = ""
    peer: str = ""

    @property
    def num_tokens(self) -> int:
        """Tokens in this call (product of the leading dims)."""
        return int(self.hidden_states.numel() // max(self.hidden_states.shape[-1], 1))


@dataclass(frozen=True)
class RouteResult:
    """A routed answer on the host, plus how it was produced."""

    output: RouterOutput
    router_version: str
    cache_hit: bool = False
    batch_requests: int = 1
    batch_tokens: int = 0
    queue_time_us: int = 0
    compute_time_us: int = 0


@runtime_checkable
class Backend(Protocol):
    """One serving stage: route a call, report its own statistics."""

    async def route(self, call: RouteCall) -> RouteResult:
        """Answer ``call`` or raise a ``DynamicMoEError``."""
        ...

    def stats(self) -> object:
        """This stage's own figures, a frozen dataclass (not the stages it wraps)."""
        ...
