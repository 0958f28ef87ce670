"""Prometheus metrics: the metric families of moe-router, and the outermost chain stage.

``RouterMetrics`` owns every family in one ``CollectorRegistry`` passed in (tests build
their own; never the global one). ``MetricsBackend`` records each call it sees, cache
hits and fast refusals included. Families that mirror a stage's own figures (per-expert
load, cache, breaker, queue depth) are read from the router's :class:`RouterFigures` at
scrape time (:meth:`RouterMetrics.watch`), so no stage has to know about Prometheus and
no figure is kept twice. Names follow Prometheus conventions: ``moe_router_`` prefix, base
units (seconds, bytes), ``_total`` counters.
"""

from __future__ import annotations

import asyncio
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from moe_router.chain.backend import Backend, RouteCall, RouteResult
from moe_router.chain.cache import output_nbytes
from moe_router.chain.call_metrics import CallMetricsCollector, RouterSeries
from moe_router.chain.figures import RouterFigures
from moe_router.config.schema import ExpertGranularity
from moe_router.errors import OverloadedError
from moe_router.status_mapping import status_code_for

__all__ = [
    "FiguresSource",
    "MetricsFigures",
    "RouterMetrics",
    "MetricsBackend",
    "start_metrics_http_server",
]

#: Experts-per-token buckets (integers; dynamic routers vary between min and max).
EXPERTS_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)

_BREAKER_STATES = ("closed", "open", "half_open")

#: Where the scrape reads one router's figures.
FiguresSource = Callable[[], RouterFigures]


@dataclass(frozen=True)
class MetricsFigures:
    """The metrics stage's own figure: calls inside it now."""

    in_flight: int


class RouterMetrics:
    """Every moe-router metric family, registered in ``registry``, plus the process, GC and
    platform collectors.

    expert_granularity: how finely the per-expert load is exported (series per router):
    ``layer``: ``moe_router_expert_tokens_total{layer, expert}`` L x E counters and
    ``moe_router_layer_load_balance_score{layer}`` L gauges; ``router``: E counters with
    ``layer="all"``; ``off``: none. The router-wide score and the experts-per-token
    histogram are exported at every granularity.
    """

    def __init__(self, registry: CollectorRegistry, *,
                 expert_granularity: ExpertGranularity = ExpertGranularity.LAYER) -> None:
        self.registry = registry
        r = registry
        for collector in (ProcessCollector, GCCollector, PlatformCollector):
            collector(registry=r)
        # The per-call families (requests, sizes, times, batches, in flight): plain counts.
        self._calls = CallMetricsCollector()
        r.register(self._calls)
        self.breaker_transitions = Counter(
            "moe_router_breaker_transitions_total", "Circuit breaker state changes.",
            ["router", "from", "to"], registry=r)
        self.rate_limited = Counter(
            "moe_router_rate_limited_total", "Calls refused by the per-caller rate limit.",
            ["router"], registry=r)
        self.aux_loss = Gauge(
            "moe_router_aux_loss",
            "Load-balancing aux loss of the last sampled call (one a second).",
            ["router"], registry=r)
        self.z_loss = Gauge(
            "moe_router_z_loss", "Router z-loss of the last sampled call (one a second).",
            ["router"], registry=r)
        self.build_info = Gauge(
            "moe_router_build_info", "Build and runtime versions (value 1).",
            ["version", "device", "python_version", "torch_version", "grpc_version"],
            registry=r)
        self._figures = _FiguresCollector(expert_granularity)
        r.register(self._figures)

    def watch(self, router: str, figures: FiguresSource) -> None:
        """Read ``router``'s per-expert, cache and breaker families from ``figures``."""
        self._figures.watch(router, figures)

    # ------------------------------------------------------------------ hooks for stages
    def batch_observer(self, router: str) -> Callable[[int, int], None]:
        """``on_batch(requests, tokens)`` for the batcher: one device call's size."""
        series = self.series(router)
        requests_hist, tokens_hist = series.batch_requests, series.batch_tokens

        def observe(requests: int, tokens: int) -> None:  # on the event loop (call_metrics)
            requests_hist.observe(requests)
            tokens_hist.observe(tokens)

        return observe

    def loss_observer(self, router: str) -> Callable[[float, float], None]:
        """``on_losses(aux, z)`` for the device stage: the losses of a sampled call."""
        aux, z = self.aux_loss.labels(router), self.z_loss.labels(router)

        def observe(aux_loss: float, z_loss: float) -> None:
            aux.set(aux_loss)
            z.set(z_loss)

        return observe

    def breaker_transition(self, router: str, old: str, new: str) -> None:
        """Count a circuit breaker transition (its ``on_state_change`` callback)."""
        self.breaker_transitions.labels(router, old, new).inc()

    def set_build_info(self, version: str, device: str) -> None:
        """Publish ``moe_router_build_info`` = 1 with the versions as labels."""
        self.build_info.clear()
        self.build_info.labels(
            version, device, platform.python_version(), torch.__version__, grpc.__version__
        ).set(1)

    # ------------------------------------------------------------------ per call
    def series(self, router: str) -> RouterSeries:
        """``router``'s per-call series (one object per router, kept by its stage)."""
        return self._calls.series(router)

    def record(self, router: str, call: RouteCall, result: RouteResult | None, code: str,
               duration_s: float, series: RouterSeries | None = None) -> None:
        """Record one finished call (``result`` None when it failed with ``code``);
        ``series``: ``router``'s series when the caller keeps them."""
        s = series if series is not None else self.series(router)
        codes = s.codes
        codes[code] = codes.get(code, 0) + 1
        s.request_duration.observe(duration_s)
        s.request_size.observe(_request_nbytes(call))
        if result is None:
            return
        output = result.output
        s.response_size.observe(output_nbytes(output))
        s.tokens_routed += call.num_tokens
        if not result.cache_hit:
            s.queue_time.observe(result.queue_time_us / 1e6)
            s.compute_time.observe(result.compute_time_us / 1e6)
            if output.aux_loss is not None:
                self.aux_loss.labels(router).set(float(output.aux_loss.detach()))
            if output.z_loss is not None:
                self.z_loss.labels(router).set(float(output.z_loss.detach()))


class MetricsBackend:
    """The outermost stage: counts, times and sizes every call, whatever its outcome.

    The ``code`` label of a failed call is its gRPC status (``status_mapping``);
    a cancelled call is ``CANCELLED``. Queue and compute time are observed for computed
    answers only (a cache hit has neither).
    """

    def __init__(self, inner: Backend, *, router: str, metrics: RouterMetrics) -> None:
        self._inner = inner
        self._router = router
        self._metrics = metrics
        self._series = metrics.series(router)

    async def route(self, call: RouteCall) -> RouteResult:
        """Pass the call on and record how it went (an answer after it has been sent:
        ``call.after_answer``)."""
        series = self._series
        series.in_flight += 1
        started = time.perf_counter()
        try:
            result = await self._inner.route(call)
        except BaseException as exc:
            code = ("CANCELLED" if isinstance(exc, asyncio.CancelledError)
                    else status_code_for(exc).name)
            if isinstance(exc, OverloadedError) and exc.reason == "RATE_LIMITED":
                self._metrics.rate_limited.labels(self._router).inc()
            self._record(call, None, code, time.perf_counter() - started)
            raise
        call.after_answer.add(self._record, call, result, "OK", time.perf_counter() - started)
        return result

    def _record(self, call: RouteCall, result: RouteResult | None, code: str,
                duration_s: float) -> None:
        self._series.in_flight -= 1
        self._metrics.record(self._router, call, result, code, duration_s, self._series)

    def stats(self) -> MetricsFigures:
        """Calls inside this stage now (the rest of its figures live in Prometheus)."""
        return MetricsFigures(in_flight=self._series.in_flight)


def start_metrics_http_server(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[Any, threading.Thread, int]:
    """Serve ``registry`` on http://host:port/metrics in a daemon thread.

    Returns (server, thread, bound_port); port 0 picks a free port. Stop with
    ``server.shutdown(); server.server_close()``.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread, int(server.server_port)


def _request_nbytes(call: RouteCall) -> int:
    tensors = [call.hidden_states, *call.options.extra_inputs.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class _FiguresCollector(Collector):
    """Per-expert load, load balance, experts per token, dropped tokens, cache, breaker
    and queue families, turned from each watched router's figures at scrape time."""

    def __init__(self, granularity: ExpertGranularity) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, FiguresSource] = {}
        self._granularity = granularity

    def watch(self, router: str, figures: FiguresSource) -> None:
        with self._lock:
            self._sources[router] = figures

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = sorted(self._sources.items())
        figures = [source() for _, source in sources]
        yield from _load_families(figures, self._granularity)
        yield from _stage_families(figures)


def _load_families(figures: list[RouterFigures],
                   granularity: ExpertGranularity) -> Iterator[Metric]:
    expert = CounterMetricFamily(
        "moe_router_expert_tokens_total",
        "Token assignments per expert (layer=\"all\" at router granularity).",
        labels=["router", "layer", "expert"])
    layer_score = GaugeMetricFamily(
        "moe_router_layer_load_balance_score",
        "Jain's index of one layer's recent per-expert load: 1 even, 1/E one expert.",
        labels=["router", "layer"])
    score = GaugeMetricFamily(
        "moe_router_load_balance_score",
        "Jain's index of the recent per-expert load over all layers: 1 even, 1/E one expert.",
        labels=["router"])
    hist = HistogramMetricFamily(
        "moe_router_experts_per_token", "Experts each answered token was sent to.",
        labels=["router"])
    dropped = CounterMetricFamily(
        "moe_router_dropped_tokens_total", "Token assignments dropped by expert capacity.",
        labels=["router"])
    for f in figures:
        requests = f.requests
        if not requests.requests:
            continue
        if granularity is ExpertGranularity.LAYER:
            for layer, counts in enumerate(requests.expert_load):
                if any(counts):
                    for index, value in enumerate(counts):
                        expert.add_metric([f.router, str(layer), str(index)], value)
            for layer, balance in enumerate(requests.recent_layer_balance):
                if balance is not None:
                    layer_score.add_metric([f.router, str(layer)], balance)
        elif granularity is ExpertGranularity.ROUTER and requests.assignments:
            for index, value in enumerate(requests.tokens_per_expert):
                expert.add_metric([f.router, "all", str(index)], value)
        recent = requests.recent_load_balance_score
        if recent is not None:
            score.add_metric([f.router], recent)
        per_k = requests.experts_per_token
        if sum(per_k):
            buckets = [(_le(bound), float(sum(per_k[: int(bound) + 1])))
                       for bound in EXPERTS_BUCKETS]
            buckets.append(("+Inf", float(sum(per_k))))
            hist.add_metric([f.router], buckets, float(requests.assignments))
        dropped.add_metric([f.router], requests.dropped_tokens)
    yield from (expert, layer_score, score, hist, dropped)


def _stage_families(figures: list[RouterFigures]) -> Iterator[Metric]:
    labels = ["router"]
    hits = CounterMetricFamily("moe_router_cache_hits_total",
                               "Calls answered from the response cache.", labels=labels)
    misses = CounterMetricFamily("moe_router_cache_misses_total",
                                 "Cacheable calls the cache could not answer.", labels=labels)
    evictions = CounterMetricFamily("moe_router_cache_evictions_total",
                                    "Entries evicted by the size bounds.", labels=labels)
    cache_bytes = GaugeMetricFamily("moe_router_cache_bytes",
                                    "Tensor bytes held by the response cache.", labels=labels)
    entries = GaugeMetricFamily("moe_router_cache_entries",
                                "Entries in the response cache.", labels=labels)
    state = GaugeMetricFamily("moe_router_breaker_state",
                              "Circuit breaker state: 1 for the state it is in, 0 for the others.",
                              labels=["router", "state"])
    depth = GaugeMetricFamily(
        "moe_router_queue_depth", "Calls inside the batcher now (queued or in their pass).",
        labels=labels)
    capacity = GaugeMetricFamily(
        "moe_router_queue_capacity",
        "Calls the batcher's queue holds at most (batching.max_queue_size).", labels=labels)
    for f in figures:
        if f.cache is not None:
            hits.add_metric([f.router], f.cache.hit_count)
            misses.add_metric([f.router], f.cache.miss_count)
            evictions.add_metric([f.router], f.cache.evictions)
            cache_bytes.add_metric([f.router], f.cache.bytes)
            entries.add_metric([f.router], f.cache.size)
        if f.breaker is not None:
            now = f.breaker.state.value.lower()
            for name in _BREAKER_STATES:
                state.add_metric([f.router, name], 1.0 if name == now else 0.0)
        if f.batcher is not None:
            depth.add_metric([f.router], f.batcher.queue_depth)
            capacity.add_metric([f.router], f.batcher.max_queue_size)
    yield from (hits, misses, evictions, cache_bytes, entries, state, depth, capacity)


def _le(bound: float) -> str:
    return str(float(bound))
