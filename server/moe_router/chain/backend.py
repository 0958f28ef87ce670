"""The one interface every chain stage implements, and the values that cross it.

A door decodes its protocol into a :class:`RouteCall`, calls the outermost stage of the
router's chain (see :mod:`moe_router.chain`), and encodes the :class:`RouteResult`.
Each stage reports its own figures as a frozen dataclass from ``stats()``; nothing
crosses the chain as a string-keyed dict.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from moe_router.routing.output import RouterOutput
from moe_router_client.frozen_init import fast_init

__all__ = ["AT_ONCE", "AfterAnswer", "RouteOptions", "RouteCall", "RouteResult", "Backend"]

log = logging.getLogger(__name__)


class AfterAnswer:
    """The records a call's stages leave until its door has sent the answer.

    What a stage records about an answered call (metrics, request figures, the
    breaker's outcome, the pass's cost) cannot change the answer, but run before it is
    sent it is as much latency as the routing itself: 57 us of Python run before a
    bare grpc.aio answer added 60 us to its p50, run right after it 4 us (measured
    here). A door that sends its own answers makes ``AfterAnswer()``, puts it on the
    call and runs it once the answer is out, on every path (``with``, or ``run`` from a
    ``finally``), and on the loop turn that sent the answer, so that nothing the caller
    does next finds the figures without it. Every other call carries :data:`AT_ONCE`,
    whose records run as they are added. A stage records a failure at once: a caller's
    error is rare and its figures must not wait for a door.
    """

    __slots__ = ("_pending",)

    def __init__(self, *, deferred: bool = True) -> None:
        self._pending: list[tuple[Callable[..., object], tuple[object, ...]]] | None = (
            [] if deferred else None)

    def add(self, record: Callable[..., object], *args: object) -> None:
        """Run ``record(*args)`` after the answer (at once when not deferred, or after
        :meth:`run`)."""
        if self._pending is None:
            record(*args)
        else:
            self._pending.append((record, args))

    def __enter__(self) -> AfterAnswer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """A door whose answer is sent inside the block: the records run as it ends."""
        self.run()

    def run(self) -> None:
        """Run the records left so far, in the order they were added; later ones run at
        once. A record that raises is logged: the answer has gone, and the rest still run."""
        pending, self._pending = self._pending, None
        for record, args in pending or ():
            try:
                record(*args)
            except Exception:
                log.exception("recording an answered call failed in %s", record)


#: The records of a call that no door defers: they run as they are added.
AT_ONCE = AfterAnswer(deferred=False)


@fast_init
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


@fast_init
@dataclass(frozen=True)
class RouteCall:
    """A decoded Route request: hidden states [T, D] or [B, S, D] as a host tensor.

    deadline: absolute ``time.monotonic()`` after which the answer is useless, or None.
    peer: the caller's identity for rate limiting (API key id or peer address).
    after_answer: where the stages leave what they record about the answer
    (:class:`AfterAnswer`).
    """

    router: str
    layer: int
    hidden_states: torch.Tensor
    options: RouteOptions = RouteOptions()
    deadline: float | None = None
    request_id: str = ""
    peer: str = ""
    after_answer: AfterAnswer = field(default=AT_ONCE, compare=False, repr=False)

    @functools.cached_property
    def num_tokens(self) -> int:
        """Tokens in this call (product of the leading dims; read once, asked by several
        stages)."""
        return int(self.hidden_states.numel() // max(self.hidden_states.shape[-1], 1))


@fast_init
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
