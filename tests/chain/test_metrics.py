"""RouterMetrics and MetricsBackend over a real chain: every family present and moving."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request

import pytest
import torch
from chain_backends import HIDDEN, FakeClock, FaultyBackend, TopKBackend, make_call
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_router.chain.batcher import BatcherFigures
from moe_router.chain.breaker import CircuitBreakerBackend
from moe_router.chain.cache import CacheBackend
from moe_router.chain.figures import RouterFigures
from moe_router.chain.metrics import (
    MetricsBackend,
    RouterMetrics,
    start_metrics_http_server,
)
from moe_router.chain.ratelimit import RateLimitBackend
from moe_router.chain.request_stats import RequestStatsBackend
from moe_router.config.schema import ExpertGranularity
from moe_router.errors import BackendError, OverloadedError, ValidationError

FAMILIES = {
    "moe_router_requests": "counter",
    "moe_router_request_duration_seconds": "histogram",
    "moe_router_request_size_bytes": "histogram",
    "moe_router_response_size_bytes": "histogram",
    "moe_router_queue_time_seconds": "histogram",
    "moe_router_compute_time_seconds": "histogram",
    "moe_router_tokens_routed": "counter",
    "moe_router_expert_tokens": "counter",
    "moe_router_experts_per_token": "histogram",
    "moe_router_batch_size_tokens": "histogram",
    "moe_router_batch_size_requests": "histogram",
    "moe_router_in_flight_requests": "gauge",
    "moe_router_queue_depth": "gauge",
    "moe_router_cache_hits": "counter",
    "moe_router_cache_misses": "counter",
    "moe_router_cache_evictions": "counter",
    "moe_router_cache_bytes": "gauge",
    "moe_router_cache_entries": "gauge",
    "moe_router_breaker_state": "gauge",
    "moe_router_breaker_transitions": "counter",
    "moe_router_rate_limited": "counter",
    "moe_router_load_balance_score": "gauge",
    "moe_router_aux_loss": "gauge",
    "moe_router_z_loss": "gauge",
    "moe_router_dropped_tokens": "counter",
    "moe_router_layer_load_balance_score": "gauge",
    "moe_router_queue_capacity": "gauge",
    "process_resident_memory_bytes": "gauge",
    "python_gc_collections": "counter",
    "python_info": "gauge",
    "moe_router_build_info": "gauge",
}


QUEUE = BatcherFigures(queue_depth=5, max_queue_size=64, device_batches=0,
                       avg_calls_per_batch=0.0)


def _chain(metrics: RouterMetrics, name: str, inner, clock: FakeClock, **cache_kwargs):
    breaker = CircuitBreakerBackend(inner, name=name, minimum_number_of_calls=2, clock=clock,
                                    on_state_change=metrics.breaker_transition)
    cache = CacheBackend(breaker, router_version="v1", stateful=False, clock=clock,
                         **cache_kwargs)
    limited = RateLimitBackend(cache, requests_per_hour=3600, burst=6, clock=clock)
    requests = RequestStatsBackend(limited, layers=1, experts=8)
    metrics.watch(name, lambda: RouterFigures(name, requests.stats(), cache=cache.stats(),
                                              breaker=breaker.stats(), batcher=QUEUE))
    return MetricsBackend(requests, router=name, metrics=metrics)


@pytest.fixture
def traffic() -> tuple[CollectorRegistry, TopKBackend]:
    """A registry after mixed traffic on two routers: hits, misses, errors, refusals."""
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    clock = FakeClock()
    real = TopKBackend()
    good = _chain(metrics, "mixtral", real, clock, cache_size=1, adaptive=False)
    flaky = _chain(metrics, "flaky", FaultyBackend(lambda c: BackendError("device lost")), clock)

    async def run():
        await good.route(make_call(seed_tensor=1))
        await good.route(make_call(seed_tensor=1))  # cache hit
        await good.route(make_call(seed_tensor=2))  # evicts entry 1
        # [B, S, D], asking for its losses: the loss gauges follow calls that ask
        await good.route(make_call(torch.randn(2, 3, HIDDEN), return_losses=True))
        for _ in range(2):
            with pytest.raises(ValidationError):  # wrong dim: misses, then fails in the router
                await good.route(make_call(torch.randn(2, HIDDEN + 1)))
        with pytest.raises(OverloadedError):  # burst of 6 used up
            await good.route(make_call())
        for _ in range(2):
            with pytest.raises(BackendError):
                await flaky.route(make_call())

    asyncio.run(run())
    metrics.batch_observer("mixtral")(3, 12)
    metrics.set_build_info("0.1.0", "cpu")
    return registry, real


def test_every_family_is_present_with_its_type(traffic) -> None:
    registry, _ = traffic
    families = {m.name: m.type for m in registry.collect()}
    missing = {n: t for n, t in FAMILIES.items() if families.get(n) != t}
    assert not missing


def test_request_counts_by_router_and_code(traffic) -> None:
    registry, _ = traffic
    value = registry.get_sample_value
    assert value("moe_router_requests_total", {"router": "mixtral", "code": "OK"}) == 4
    assert value("moe_router_requests_total",
                 {"router": "mixtral", "code": "INVALID_ARGUMENT"}) == 2
    assert value("moe_router_requests_total",
                 {"router": "mixtral", "code": "RESOURCE_EXHAUSTED"}) == 1
    assert value("moe_router_requests_total", {"router": "flaky", "code": "INTERNAL"}) == 2
    assert value("moe_router_rate_limited_total", {"router": "mixtral"}) == 1
    assert value("moe_router_request_duration_seconds_count", {"router": "mixtral"}) == 7
    assert value("moe_router_in_flight_requests", {"router": "mixtral"}) == 0


def test_tokens_and_expert_load_follow_the_router(traffic) -> None:
    registry, real = traffic
    value = registry.get_sample_value
    assert value("moe_router_tokens_routed_total", {"router": "mixtral"}) == 4 + 4 + 4 + 6
    per_expert = [value("moe_router_expert_tokens_total",
                        {"router": "mixtral", "layer": "0", "expert": str(e)}) for e in range(8)]
    assert sum(per_expert) == 18 * 2  # top-2 for 18 tokens
    expected = torch.zeros(8, dtype=torch.int64)
    for seed in (1, 1, 2):
        expected += real.router(make_call(seed_tensor=seed).hidden_states).tokens_per_expert
    # the [B, S, D] call's counts make up the rest
    assert sum(per_expert) - int(expected.sum()) == 12
    assert value("moe_router_experts_per_token_count", {"router": "mixtral"}) == 18
    assert value("moe_router_experts_per_token_sum", {"router": "mixtral"}) == 36
    assert value("moe_router_experts_per_token_bucket", {"router": "mixtral", "le": "1.0"}) == 0
    assert value("moe_router_experts_per_token_bucket", {"router": "mixtral", "le": "2.0"}) == 18
    score = value("moe_router_load_balance_score", {"router": "mixtral"})
    assert 1 / 8 <= score <= 1.0
    assert value("moe_router_aux_loss", {"router": "mixtral"}) > 0


def test_cache_breaker_and_batch_families_move(traffic) -> None:
    registry, _ = traffic
    value = registry.get_sample_value
    assert value("moe_router_cache_hits_total", {"router": "mixtral"}) == 1
    assert value("moe_router_cache_misses_total", {"router": "mixtral"}) == 5
    assert value("moe_router_cache_evictions_total", {"router": "mixtral"}) == 2
    assert value("moe_router_cache_entries", {"router": "mixtral"}) == 1
    assert value("moe_router_cache_bytes", {"router": "mixtral"}) > 0
    assert value("moe_router_breaker_state", {"router": "mixtral", "state": "closed"}) == 1
    assert value("moe_router_breaker_state", {"router": "mixtral", "state": "open"}) == 0
    assert value("moe_router_breaker_state", {"router": "flaky", "state": "open"}) == 1
    assert value("moe_router_breaker_state", {"router": "flaky", "state": "closed"}) == 0
    assert value("moe_router_breaker_transitions_total",
                 {"router": "flaky", "from": "CLOSED", "to": "OPEN"}) == 1
    assert value("moe_router_batch_size_tokens_sum", {"router": "mixtral"}) == 12
    assert value("moe_router_batch_size_requests_sum", {"router": "mixtral"}) == 3
    assert value("moe_router_queue_depth", {"router": "mixtral"}) == 5
    # queue and compute time come from computed answers only: 3 on mixtral, no cache hit
    assert value("moe_router_queue_time_seconds_count", {"router": "mixtral"}) == 3
    assert value("moe_router_compute_time_seconds_sum", {"router": "mixtral"}) > 0
    assert value("moe_router_request_size_bytes_sum", {"router": "mixtral"}) > 0
    assert value("moe_router_response_size_bytes_count", {"router": "mixtral"}) == 4
    build = [s for m in registry.collect() if m.name == "moe_router_build_info"
             for s in m.samples]
    assert build[0].value == 1 and build[0].labels["version"] == "0.1.0"


def test_exposition_parses_back(traffic) -> None:
    registry, _ = traffic
    text = generate_latest(registry).decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert set(FAMILIES) <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_promtool_check_metrics_passes(traffic) -> None:
    registry, _ = traffic
    result = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_cancelled_calls_are_counted_as_cancelled() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    real = TopKBackend()
    backend = MetricsBackend(real, router="mixtral", metrics=metrics)

    async def run():
        real.gate = asyncio.Event()
        task = asyncio.create_task(backend.route(make_call()))
        await asyncio.sleep(0)
        assert registry.get_sample_value("moe_router_in_flight_requests",
                                         {"router": "mixtral"}) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert registry.get_sample_value("moe_router_requests_total",
                                     {"router": "mixtral", "code": "CANCELLED"}) == 1
    assert registry.get_sample_value("moe_router_in_flight_requests", {"router": "mixtral"}) == 0


def test_http_server_on_port_zero_reports_its_port() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    metrics.set_build_info("0.1.0", "cpu")
    server, thread, port = start_metrics_http_server(registry, "127.0.0.1", 0)
    try:
        assert port > 0 and thread.is_alive()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert "moe_router_build_info{" in body
    finally:
        server.shutdown()
        server.server_close()


def test_losses_dropped_tokens_and_queue_capacity_are_exported(traffic) -> None:
    registry, _ = traffic
    value = registry.get_sample_value
    assert value("moe_router_z_loss", {"router": "mixtral"}) > 0
    assert value("moe_router_dropped_tokens_total", {"router": "mixtral"}) == 0
    assert value("moe_router_queue_capacity", {"router": "mixtral"}) == 64
    layer0 = value("moe_router_layer_load_balance_score", {"router": "mixtral", "layer": "0"})
    assert 1 / 8 <= layer0 <= 1.0
    assert value("process_resident_memory_bytes") > 0


@pytest.mark.parametrize(("granularity", "series"), [
    (ExpertGranularity.LAYER, 3 * 8 + 3), (ExpertGranularity.ROUTER, 8),
    (ExpertGranularity.OFF, 0)])
def test_expert_granularity_sets_the_series_count(granularity, series) -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, expert_granularity=granularity)
    stage = RequestStatsBackend(TopKBackend(), layers=3, experts=8)
    metrics.watch("r", lambda: RouterFigures("r", stage.stats()))
    chain = MetricsBackend(stage, router="r", metrics=metrics)

    async def run():
        for layer in range(3):
            await chain.route(make_call(router="r", layer=layer, seed_tensor=layer))

    asyncio.run(run())
    per_expert = [s for m in registry.collect()
                  if m.name in ("moe_router_expert_tokens", "moe_router_layer_load_balance_score")
                  for s in m.samples]
    assert len(per_expert) == series
    if granularity is ExpertGranularity.ROUTER:
        assert {s.labels["layer"] for s in per_expert} == {"all"}
        assert sum(s.value for s in per_expert) == 3 * 4 * 2
    assert registry.get_sample_value("moe_router_load_balance_score", {"router": "r"}) > 0
