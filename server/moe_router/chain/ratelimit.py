"""Rate limit stage: a token bucket per caller, refusing calls over ``requests_per_hour``.

Each caller (``RouteCall.peer``: the API key id, else the peer address; calls with no
identity share one bucket) owns a bucket of ``burst`` tokens that refills at
``requests_per_hour / 3600`` tokens per second; a call takes one token or is refused with
``OverloadedError(reason="RATE_LIMITED")`` whose ``retry_after_s`` is the time until the
next token. ``burst`` defaults to one minute's worth of requests,
``max(1, ceil(requests_per_hour / 60))``, so a caller may spend a minute's quota at once
but never more than the hourly rate over time.

Memory stays bounded: a bucket idle for ``burst / rate`` seconds is full again, the same
as a new one, so it is dropped without changing any answer; past ``max_callers`` the
least recently seen bucket is dropped too (that caller starts over with a full bucket).

The limit is per caller, not per router: the limiters of a server's routers share one
bucket table (``shared_with``), so a caller cannot multiply its quota by the router count.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from moe_router.chain.backend import Backend, RouteCall, RouteResult
from moe_router.errors import OverloadedError, RouterConfigurationError

__all__ = ["RateLimitBackend", "RateLimitFigures"]


@dataclass(frozen=True)
class RateLimitFigures:
    """The per-caller quota, how many callers hold a bucket, calls admitted and refused."""

    requests_per_hour: int
    burst: int
    tracked_callers: int
    admitted_calls: int
    limited_calls: int


class RateLimitBackend:
    """A Backend that lets each caller through at most ``requests_per_hour`` (token bucket)."""

    def __init__(
        self,
        inner: Backend,
        *,
        requests_per_hour: int,
        burst: int | None = None,
        max_callers: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        shared_with: RateLimitBackend | None = None,
    ) -> None:
        """``shared_with``: another limiter (same rate and burst) whose buckets this one uses,
        so one caller has one bucket across every router of the server."""
        for value, name in ((requests_per_hour, "requests_per_hour"), (max_callers, "max_callers")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RouterConfigurationError(f"{name}: must be a positive integer, got {value!r}")
        if burst is None:
            burst = max(1, math.ceil(requests_per_hour / 60))
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise RouterConfigurationError(
                f"burst: must be a positive integer or None, got {burst!r}"
            )
        self._inner = inner
        self._rate = requests_per_hour / 3600.0
        self._requests_per_hour = requests_per_hour
        self._burst = burst
        self._idle_full_s = burst / self._rate
        self._max_callers = max_callers
        self._clock = clock
        self._lock = threading.Lock()
        # caller -> (tokens, last refill time); ordered by last use, oldest first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        if shared_with is not None:
            if (shared_with._requests_per_hour, shared_with._burst) != (requests_per_hour, burst):
                raise RouterConfigurationError(
                    "shared_with: must have the same requests_per_hour and burst "
                    f"({shared_with._requests_per_hour}, {shared_with._burst}), got "
                    f"({requests_per_hour}, {burst})"
                )
            self._lock, self._buckets = shared_with._lock, shared_with._buckets
        self._limited = 0
        self._admitted = 0

    async def route(self, call: RouteCall) -> RouteResult:
        """Take a token from the caller's bucket and pass the call on, or refuse it."""
        self._take(call.peer)
        return await self._inner.route(call)

    def stats(self) -> RateLimitFigures:
        """The quota, callers tracked, calls admitted and refused by this router's limiter."""
        with self._lock:
            return RateLimitFigures(
                requests_per_hour=self._requests_per_hour,
                burst=self._burst,
                tracked_callers=len(self._buckets),
                admitted_calls=self._admitted,
                limited_calls=self._limited,
            )

    def _take(self, caller: str) -> None:
        now = self._clock()
        with self._lock:
            self._forget_idle(now)
            tokens, last = self._buckets.pop(caller, (float(self._burst), now))
            tokens = min(float(self._burst), tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                self._admitted += 1
                return
            self._buckets[caller] = (tokens, now)
            self._limited += 1
            retry_after = (1.0 - tokens) / self._rate
        raise OverloadedError(
            f"rate limit of {self._requests_per_hour} requests per hour "
            f"(burst {self._burst}) reached; retry in {retry_after:.2f}s",
            retry_after_s=retry_after,
            reason="RATE_LIMITED",
        )

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that are full again (lossless), then the oldest past max_callers."""
        while self._buckets:
            _, last = next(iter(self._buckets.values()))
            if now - last < self._idle_full_s:
                break
            self._buckets.popitem(last=False)
        while len(self._buckets) >= self._max_callers:
            self._buckets.popitem(last=False)
