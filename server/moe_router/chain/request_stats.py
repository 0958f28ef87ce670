"""RequestStatsBackend: per-router request counts and latency percentiles for the Stats RPC.

Prometheus histograms answer "how many under X seconds"; the Stats RPC answers
p50/p95/p99 directly, from a bounded window of the most recent latencies.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np

from moe_router.chain.backend import Backend, RouteCall, RouteResult
from moe_router.errors import AuthenticationError, ValidationError

#: Errors that say the caller sent something wrong; they do not count as failures.
_CALLER_ERRORS = (ValidationError, AuthenticationError)

__all__ = ["RequestStatsBackend"]


class RequestStatsBackend:
    """Counts requests, tokens, errors and failures (errors that were not the caller's
    bad input), and keeps the last ``window`` latencies."""

    def __init__(self, inner: Backend, *, window: int = 4096) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._latencies_ms: deque[float] = deque(maxlen=window)
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=window)  # (when, failed)
        self.requests = 0
        self.tokens = 0
        self.errors = 0  # every failed call
        self.failures = 0  # failed calls that were not the caller's own fault

    async def route(self, call: RouteCall) -> RouteResult:
        """Pass ``call`` on and record its outcome and latency."""
        started = time.perf_counter()
        try:
            result = await self.inner.route(call)
        except BaseException as exc:
            with self._lock:
                self.requests += 1
                self.errors += 1
                failed = not isinstance(exc, _CALLER_ERRORS)
                self.failures += failed
                self._outcomes.append((time.monotonic(), failed))
            raise
        elapsed_ms = (time.perf_counter() - started) * 1e3
        with self._lock:
            self.requests += 1
            self.tokens += call.num_tokens
            self._latencies_ms.append(elapsed_ms)
            self._outcomes.append((time.monotonic(), False))
        return result

    def recent_failure_rate(self, horizon_s: float = 60.0) -> float | None:
        """Failures / calls over the last ``horizon_s`` seconds (None without calls), so
        an alert clears once a router has recovered instead of carrying its history."""
        since = time.monotonic() - horizon_s
        with self._lock:
            recent = [failed for when, failed in self._outcomes if when >= since]
        return sum(recent) / len(recent) if recent else None

    def latency(self) -> dict[str, float]:
        """p50/p95/p99/mean in milliseconds over the recent window, and the sample count."""
        with self._lock:
            samples = np.fromiter(self._latencies_ms, dtype=np.float64)
        if samples.size == 0:
            return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "samples": 0}
        p50, p95, p99 = np.percentile(samples, [50, 95, 99])
        return {
            "p50_ms": float(p50),
            "p95_ms": float(p95),
            "p99_ms": float(p99),
            "mean_ms": float(samples.mean()),
            "samples": int(samples.size),
        }

    def stats(self) -> dict[str, Any]:
        """Request figures merged over the inner stages' statistics."""
        stats = dict(self.inner.stats())
        with self._lock:
            stats.update(requests=self.requests, tokens=self.tokens, errors=self.errors,
                         failures=self.failures)
        stats["latency"] = self.latency()
        return stats
