"""RequestStatsBackend: what a router answered — the one place its request figures live.

Counts requests, tokens, errors and failures, keeps the last latencies for p50/p95/p99
(Prometheus histograms answer "how many under X seconds"; Stats answers percentiles),
and the per-expert load of every answered call, cache hits included (the experts
downstream compute for every answer). Stats, the metrics families and the alerts all
read :class:`RequestFigures` from here; nothing else keeps a copy.

A failure is an error of our own: anything but ``errors.NOT_OUR_FAULT`` (the caller's
mistakes and load shedding) and cancellation. The error rate the alerts judge is
failures / calls over the last minute, so an alert clears once a router has recovered
instead of carrying its history.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_router.chain.backend import Backend, RouteCall, RouteResult
from moe_router.errors import NOT_OUR_FAULT
from moe_router.routing import functional as F

__all__ = ["Durations", "LatencySummary", "RequestFigures", "RequestStatsBackend"]

#: The error rate looks at calls finished within this many seconds.
ERROR_RATE_HORIZON_S = 60.0


@dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles and mean in milliseconds over the recent window."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    samples: int


@dataclass(frozen=True)
class Durations:
    """Sums over answered calls: all of them (latency) and those computed (not cache hits).

    last_answer_unix_s: wall-clock time of the last answer (0 before any).
    """

    answered: int
    computed: int
    latency_total_s: float
    queue_total_us: int
    compute_total_us: int
    last_answer_unix_s: float


@dataclass(frozen=True)
class RequestFigures:
    """One router's request figures since start.

    expert_load: per layer, assignments per expert of every answered call ([L][E]).
    experts_per_token: index k holds how many answered tokens went to k experts.
    error_rate: failures / calls over the last minute (None without calls).
    durations: cumulative times of the answered calls (Triton's statistics need sums).
    """

    requests: int
    tokens: int
    errors: int
    failures: int
    error_rate: float | None
    latency: LatencySummary
    expert_load: tuple[tuple[int, ...], ...]
    experts_per_token: tuple[int, ...]
    dropped_tokens: int
    durations: Durations = field(default_factory=lambda: Durations(0, 0, 0.0, 0, 0, 0.0))
    recent_expert_load: tuple[tuple[int, ...], ...] = ()

    @property
    def tokens_per_expert(self) -> tuple[int, ...]:
        """Assignments per expert summed over layers [E]."""
        return tuple(int(x) for x in np.sum(self.expert_load, axis=0)) if self.expert_load else ()

    @property
    def assignments(self) -> int:
        """Token-to-expert assignments answered."""
        return sum(k * n for k, n in enumerate(self.experts_per_token))

    @property
    def avg_experts_per_token(self) -> float:
        """Mean experts per answered token (0 before any)."""
        tokens = sum(self.experts_per_token)
        return self.assignments / tokens if tokens else 0.0

    @property
    def load_balance_score(self) -> float:
        """Jain's index of the per-expert load over all layers: 1 even, 1/E one expert."""
        return F.load_balance_score(torch.tensor(self.tokens_per_expert, dtype=torch.int64))

    @property
    def usage_variance(self) -> float:
        """Population variance of the per-expert assignments over all layers."""
        load = np.asarray(self.tokens_per_expert, dtype=np.float64)
        return float(load.var()) if load.size else 0.0

    @property
    def load_share_variance(self) -> float | None:
        """Population variance of each expert's share of the assignments (None before any)."""
        return _share_variance(np.sum(self.expert_load, axis=0) if self.expert_load else ())

    @property
    def recent_load_balance_score(self) -> float | None:
        """Jain's index over all layers of the recent window's load (None without traffic)."""
        load = np.sum(self.recent_expert_load, axis=0) if self.recent_expert_load else ()
        return _jain(load)

    @property
    def recent_load_share_variance(self) -> float | None:
        """Variance of the experts' shares of the recent window's assignments."""
        load = np.sum(self.recent_expert_load, axis=0) if self.recent_expert_load else ()
        return _share_variance(load)

    @property
    def recent_layer_balance(self) -> tuple[float | None, ...]:
        """Jain's index of each layer's recent load (None for a layer without traffic)."""
        return tuple(_jain(layer) for layer in self.recent_expert_load)


def _jain(load: object) -> float | None:
    values = np.asarray(load, dtype=np.float64)
    total = values.sum() if values.size else 0.0
    return float(total * total / (values.size * (values * values).sum())) if total else None


def _share_variance(load: object) -> float | None:
    values = np.asarray(load, dtype=np.float64)
    total = values.sum() if values.size else 0.0
    return float((values / total).var()) if total else None


class _ExpertLoad:
    """Per-layer per-expert assignment counts, since start and over a recent window, and
    the experts-per-token histogram.

    The window is a ring of ``_BUCKETS`` [L, E] buckets of ``window_s / _BUCKETS``
    seconds each. A call only appends its answer's [E] counts and experts per token to a
    pending list (a few hundred nanoseconds); they are folded into the totals, the
    current bucket and the histogram with four torch ops per ``_FOLD_EVERY`` calls, and
    before the ring moves on or anyone reads (measured here: the eight torch ops a call
    made on its own cost ~70 us, a quarter of the chain's own time on a 1-token call).
    """

    _BUCKETS = 10
    _FOLD_EVERY = 256

    def __init__(self, layers: int, experts: int, window_s: float) -> None:
        self._lock = threading.Lock()
        self._load = torch.zeros(layers, experts, dtype=torch.int64)
        self._ring = torch.zeros(self._BUCKETS, layers, experts, dtype=torch.int64)
        self._span_s = window_s / self._BUCKETS
        self._current = 0
        self._current_start = time.monotonic()
        self._per_k = torch.zeros(experts + 1, dtype=torch.int64)
        self._dropped = 0
        # (layer, tokens_per_expert [E], num_experts_per_token [...]) not folded in yet
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, layer: int, result: RouteResult) -> None:
        output = result.output
        entry = (layer, output.tokens_per_expert, output.num_experts_per_token)
        with self._lock:
            if time.monotonic() - self._current_start >= self._span_s:
                self._advance(time.monotonic())  # folds what belongs to the old bucket
            self._pending.append(entry)
            self._dropped += output.dropped_tokens
            if len(self._pending) >= self._FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        """Add the pending answers to the totals, the current bucket and the histogram
        (lock held)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        layers = torch.tensor([layer for layer, _, _ in pending], dtype=torch.int64)
        # One router's answers: integer tensors on one device, never in an autograd
        # graph. Stacked as they are and moved once (two ops per call less than moving
        # each one: detach and .to are dispatches even when they change nothing).
        counts = torch.stack([c for _, c, _ in pending]).to("cpu", torch.int64)
        self._load.index_add_(0, layers, counts)
        self._ring[self._current].index_add_(0, layers, counts)
        per_token = torch.cat([k if k.dim() == 1 else k.reshape(-1)
                               for _, _, k in pending]).to("cpu", torch.int64)
        width = self._per_k.numel()
        self._per_k.add_(torch.bincount(per_token, minlength=width)[:width])

    def _advance(self, now: float) -> None:
        """Move the ring to the bucket of ``now``, emptying the buckets passed (lock held).
        The pending answers are folded into the bucket they came in first."""
        steps = int((now - self._current_start) // self._span_s)
        if steps <= 0:
            return
        self._fold()
        for _ in range(min(steps, self._BUCKETS)):
            self._current = (self._current + 1) % self._BUCKETS
            self._ring[self._current].zero_()
        self._current_start += steps * self._span_s

    def snapshot(self) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...],
                                tuple[int, ...], int]:
        with self._lock:
            self._advance(time.monotonic())
            self._fold()
            load, recent = self._load.tolist(), self._ring.sum(0).tolist()
            per_k, dropped = self._per_k.tolist(), self._dropped
        return (tuple(tuple(row) for row in load), tuple(tuple(row) for row in recent),
                tuple(per_k), dropped)


class RequestStatsBackend:
    """Counts every call's outcome and latency and the expert load of its answer.

    layers / experts: the router's geometry (the load is kept as an [L, E] tensor).
    window: how many recent latencies (and outcomes) are kept.
    load_window_s: how much recent traffic the recent expert load covers.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        layers: int,
        experts: int,
        window: int = 4096,
        load_window_s: float = 300.0,
    ) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._latencies_ms: deque[float] = deque(maxlen=window)
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=window)  # (when, failed)
        self._load = _ExpertLoad(layers, experts, load_window_s)
        self._requests = self._tokens = self._errors = self._failures = 0
        self._computed = self._queue_us = self._compute_us = 0
        self._latency_s = self._last_answer = 0.0

    async def route(self, call: RouteCall) -> RouteResult:
        """Pass ``call`` on and record its outcome, latency and expert load (an answer's
        after it has been sent: ``call.after_answer``)."""
        started = time.perf_counter()
        try:
            result = await self.inner.route(call)
        except BaseException as exc:
            failed = isinstance(exc, Exception) and not isinstance(exc, NOT_OUR_FAULT)
            with self._lock:
                self._requests += 1
                self._errors += 1
                self._failures += failed
                self._outcomes.append((time.monotonic(), failed))
            raise
        call.after_answer.add(self._record_answer, call, result, time.perf_counter() - started)
        return result

    def _record_answer(self, call: RouteCall, result: RouteResult, elapsed_s: float) -> None:
        self._load.add(call.layer, result)
        with self._lock:
            self._requests += 1
            self._tokens += call.num_tokens
            self._latencies_ms.append(elapsed_s * 1e3)
            self._outcomes.append((time.monotonic(), False))
            self._latency_s += elapsed_s
            self._last_answer = time.time()
            if not result.cache_hit:
                self._computed += 1
                self._queue_us += result.queue_time_us
                self._compute_us += result.compute_time_us

    def stats(self) -> RequestFigures:
        """The figures now."""
        since = time.monotonic() - ERROR_RATE_HORIZON_S
        with self._lock:
            samples = np.fromiter(self._latencies_ms, dtype=np.float64)
            recent = [failed for when, failed in self._outcomes if when >= since]
            counts = (self._requests, self._tokens, self._errors, self._failures)
            durations = Durations(self._requests - self._errors, self._computed,
                                  self._latency_s, self._queue_us, self._compute_us,
                                  self._last_answer)
        load, recent_load, per_k, dropped = self._load.snapshot()
        return RequestFigures(
            *counts,
            error_rate=sum(recent) / len(recent) if recent else None,
            latency=_summary(samples),
            expert_load=load,
            experts_per_token=per_k,
            dropped_tokens=dropped,
            durations=durations,
            recent_expert_load=recent_load,
        )


def _summary(samples: np.ndarray) -> LatencySummary:
    if samples.size == 0:
        return LatencySummary(0.0, 0.0, 0.0, 0.0, 0)
    p50, p95, p99 = np.percentile(samples, [50, 95, 99])
    return LatencySummary(float(p50), float(p95), float(p99), float(samples.mean()),
                          int(samples.size))
