"""End to end over loopback: the response cache, circuit breaker and Prometheus metrics of
the real server (in-process, ``create_server``), seen only through the client, the health
services and a live /metrics scrape."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess_server import InProcessServer, serve_in_process
from prometheus_client.parser import text_string_to_metric_families
from server_process import small_routers, write_config

from moe_router.chain.backend import RouteCall, RouteOptions
from moe_router.chain.cache import cache_key
from moe_router_client import AsyncRouterClient, RouterClient
from moe_router_client.errors import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BREAKER = {
    "sliding_window_size": 4,
    "minimum_number_of_calls": 4,
    "failure_rate_threshold": 0.5,
    "wait_duration_s": 1.5,
    "permitted_calls_in_half_open": 2,
}
TIGHT_MAX_BYTES = 64 * 1024
TIGHT_TTL_S = 1.0


@dataclass
class Served:
    """A running server and the folder whose files drive its `faulty` router."""

    server: InProcessServer
    fault_dir: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: every router kind plus `faulty`, the default cache, a
    breaker that opens after 4 calls, and `mixtral-wait`, a copy of `mixtral` whose batcher
    may hold calls up to 50 ms, so concurrent identical calls can meet in flight."""
    tmp = tmp_path_factory.mktemp("middleware")
    routers = small_routers(fault_dir=tmp)
    mixtral = next(r for r in routers if r["name"] == "mixtral")
    routers.append({**mixtral, "name": "mixtral-wait", "batching": {"max_queue_delay_us": 50000,
                                                                    "inline_max_us": 0}})
    config = write_config(
        tmp / "config.yaml",
        routers,
        testing={"enable_fault_injection": True},
        breaker=BREAKER,
        # Injected faults would also fire the error-rate alert (tests/test_alerts.py);
        # here only the breaker decides the health statuses.
        monitoring={"alert_thresholds": {"error_rate": 1.0}},
    )
    with serve_in_process(config) as server:
        yield Served(server, tmp)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory):
    """A server whose cache holds 64 KiB for one second."""
    tmp = tmp_path_factory.mktemp("tight-cache")
    routers = [r for r in small_routers() if r["name"] == "mixtral"]
    config = write_config(
        tmp / "config.yaml",
        routers,
        cache={"max_bytes": TIGHT_MAX_BYTES, "ttl_seconds": TIGHT_TTL_S, "adaptive": False},
    )
    with serve_in_process(config) as server:
        yield server


@pytest.fixture()
def client(served: Served):
    with RouterClient(served.server.target, timeout=30, retries=0) as c:
        yield c


def tokens(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def assert_same_answer(a, b) -> None:
    np.testing.assert_array_equal(a.expert_indices, b.expert_indices)
    np.testing.assert_array_equal(a.expert_weights, b.expert_weights)
    np.testing.assert_array_equal(a.num_experts_per_token, b.num_experts_per_token)
    assert a.info.tokens_per_expert == b.info.tokens_per_expert
    assert a.info.router_version == b.info.router_version


def cache_stats(client: RouterClient, router: str):
    (stats,) = client.stats(router)
    assert stats.cache is not None, f"{router} has no cache"
    return stats.cache


def breaker_stats(client: RouterClient, router: str = "faulty"):
    (stats,) = client.stats(router)
    assert stats.breaker is not None, f"{router} has no breaker"
    return stats.breaker


def assert_still_serves(client: RouterClient) -> None:
    result = client.route("mixtral", tokens((2, 64), 99), skip_cache=True)
    assert result.expert_indices.shape == (2, 2)


def eventually(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Retry ``check`` (assertions inside) until it passes; the last failure is raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def grpc_health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def scrape(port: int | None) -> str:
    assert port is not None, "metrics endpoint is off"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of a Prometheus text exposition."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(scraped: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    assert name in scraped, f"{name} missing from the scrape"
    matching = [v for lab, v in scraped[name] if labels.items() <= lab.items()]
    assert matching, f"{name} has no sample with labels {labels}: {scraped[name][:5]}"
    return sum(matching)


# --------------------------------------------------------------------------- cache
def test_repeated_call_is_a_cache_hit_with_the_identical_answer(client):
    x = tokens((5, 64), 1)
    before = cache_stats(client, "mixtral")
    first = client.route("mixtral", x, layer=1)
    second = client.route("mixtral", x, layer=1)
    after = cache_stats(client, "mixtral")
    assert not first.info.cache_hit and second.info.cache_hit
    assert_same_answer(first, second)
    assert second.info.compute_time_us == 0 and second.info.batch_requests == 0
    assert (after.hit_count, after.miss_count) == (before.hit_count + 1, before.miss_count + 1)
    assert after.size == before.size + 1 and after.bytes > before.bytes

    # Layer and options are part of the key: another layer or asking for logits computes.
    other_layer = client.route("mixtral", x, layer=0)
    with_logits = client.route("mixtral", x, layer=1, return_router_logits=True)
    assert not other_layer.info.cache_hit and not with_logits.info.cache_hit
    assert with_logits.router_logits.shape == (5, 8)
    assert_same_answer(first, with_logits)
    assert cache_stats(client, "mixtral").miss_count == after.miss_count + 2


def test_skip_cache_computes_a_fresh_answer_and_leaves_the_cache_alone(client):
    x = tokens((3, 64), 2)
    cached = client.route("mixtral", x)
    before = cache_stats(client, "mixtral")
    fresh = client.route("mixtral", x, skip_cache=True)
    after = cache_stats(client, "mixtral")
    assert not fresh.info.cache_hit and fresh.info.batch_requests >= 1
    assert_same_answer(cached, fresh)
    assert (after.hit_count, after.miss_count, after.size) == (
        before.hit_count,
        before.miss_count,
        before.size,
    )
    assert client.route("mixtral", x).info.cache_hit  # the entry is still there


def test_same_bytes_with_another_shape_or_dtype_never_share_an_entry(client):
    # deepseek (D=32): [4, 32] and [2, 2, 32] hold the same bytes.
    flat = tokens((4, 32), 3)
    by_tokens = client.route("deepseek", flat)
    by_batch = client.route("deepseek", flat.reshape(2, 2, 32))
    assert not by_batch.info.cache_hit
    assert by_tokens.expert_indices.shape == (4, 4) and by_batch.expert_indices.shape == (2, 2, 4)
    np.testing.assert_array_equal(by_batch.expert_indices.reshape(4, 4), by_tokens.expert_indices)

    # mixtral (D=64): float16 [4, 64] read as float32 is [2, 64]: same bytes, other answer.
    half = (tokens((4, 64), 4) * 2).astype(np.float16)
    as_single = half.view(np.float32).reshape(2, 64)
    assert as_single.tobytes() == half.tobytes()
    assert as_single.shape == (2, 64) and np.isfinite(as_single).all()
    answer_half = client.route("mixtral", half)
    answer_single = client.route("mixtral", as_single)
    assert not answer_single.info.cache_hit
    assert answer_half.expert_indices.shape == (4, 2)
    assert answer_single.expert_indices.shape == (2, 2)
    assert_same_answer(answer_single, client.route("mixtral", as_single, skip_cache=True))
    assert_same_answer(answer_half, client.route("mixtral", half, skip_cache=True))

    # The key itself, in process: shape and dtype sit beside the byte hash.
    raw = torch.from_numpy(half)
    keys = {
        cache_key(RouteCall("mixtral", 0, t), "v1")
        for t in (raw, raw.view(torch.float32), raw.view(torch.bfloat16), raw.reshape(2, 2, 64))
    }
    assert len(keys) == 4
    assert cache_key(RouteCall("mixtral", 0, raw.clone()), "v1") in keys  # equal input, equal key
    assert cache_key(RouteCall("mixtral", 0, raw, RouteOptions(seed=1)), "v1") not in keys


def test_concurrent_identical_calls_compute_once(served: Served, client):
    # Whether a call joins the one in flight or finds its stored answer, the cache must
    # compute once: one miss, 31 hits (joining is counted as a hit).
    x = tokens((7, 64), 5)
    before = cache_stats(client, "mixtral-wait")

    async def fire():
        async with AsyncRouterClient(served.server.target, timeout=30, retries=0) as c:
            return await asyncio.gather(*(c.route("mixtral-wait", x) for _ in range(32)))

    results = asyncio.run(fire())
    after = cache_stats(client, "mixtral-wait")
    assert after.miss_count == before.miss_count + 1
    assert after.hit_count == before.hit_count + 31
    assert sum(not r.info.cache_hit for r in results) == 1
    for result in results[1:]:
        assert_same_answer(results[0], result)


def test_an_entry_expires_after_its_ttl(tight: InProcessServer):
    x = tokens((4, 64), 6)
    with RouterClient(tight.target, timeout=30, retries=0) as c:
        before = cache_stats(c, "mixtral")
        started = time.monotonic()
        first = c.route("mixtral", x)
        again = c.route("mixtral", x)
        if time.monotonic() - started < TIGHT_TTL_S:  # a stalled machine may take longer
            assert again.info.cache_hit
        time.sleep(TIGHT_TTL_S * 1.3)
        expired = c.route("mixtral", x)
        after = cache_stats(c, "mixtral")
    assert not first.info.cache_hit and not expired.info.cache_hit
    assert_same_answer(first, expired)
    assert after.miss_count >= before.miss_count + 2
    assert after.ttl_seconds == TIGHT_TTL_S


def test_a_flood_of_distinct_calls_stays_within_the_byte_bound(tight: InProcessServer):
    with RouterClient(tight.target, timeout=30, retries=0) as c:
        for seed in range(50):
            result = c.route("mixtral", tokens((256, 64), 1000 + seed))
            assert not result.info.cache_hit
            stats = cache_stats(c, "mixtral")
            assert 0 < stats.bytes <= TIGHT_MAX_BYTES, stats
        assert stats.max_bytes == TIGHT_MAX_BYTES
        assert stats.evictions > 0 and stats.size < 50
        scraped = samples(scrape(tight.metrics_port))
        assert value(scraped, "moe_router_cache_evictions_total", router="mixtral") > 0
        assert 0 < value(scraped, "moe_router_cache_bytes", router="mixtral") <= TIGHT_MAX_BYTES
        assert c.route("mixtral", tokens((2, 64), 7)).expert_indices.shape == (2, 2)


# --------------------------------------------------------------------------- breaker
def trip_breaker(client: RouterClient, fault_dir: Path) -> tuple[int, UnavailableError]:
    """Make `faulty` fail until its breaker opens: (failed calls it took, the refusal)."""
    (fault_dir / "fail").touch()
    x = tokens((2, 16), 8)
    for failed in range(20):
        try:
            client.route("faulty", x)
        except InternalError as exc:
            assert "injected fault" in exc.details
            continue
        except UnavailableError as exc:
            return failed, exc
        raise AssertionError("a call to the failing router succeeded")
    raise AssertionError("the breaker never opened")


def heal_breaker(client: RouterClient, fault_dir: Path) -> None:
    """Remove the fault, wait out the open period and send the half-open probes."""
    (fault_dir / "fail").unlink(missing_ok=True)
    time.sleep(breaker_stats(client).retry_after_s + 0.1)
    for _ in range(BREAKER["permitted_calls_in_half_open"]):
        assert client.route("faulty", tokens((2, 16), 9)).expert_indices.shape == (2, 2)


@pytest.fixture()
def fault_dir(served: Served):
    yield served.fault_dir
    (served.fault_dir / "fail").unlink(missing_ok=True)


def test_breaker_opens_fails_fast_reports_degraded_and_recovers(served: Served, client, fault_dir):
    target = served.server.target
    before = breaker_stats(client)
    assert before.state == "CLOSED"
    failed, refusal = trip_breaker(client, fault_dir)
    assert 1 <= failed <= BREAKER["sliding_window_size"]
    assert refusal.reason == "CIRCUIT_OPEN"
    assert 0 < refusal.retry_after_s <= BREAKER["wait_duration_s"]
    assert "faulty" in refusal.details and "circuit breaker is open" in refusal.details

    opened = breaker_stats(client)
    assert opened.state == "OPEN" and opened.failure_rate >= 0.5
    for _ in range(3):
        with pytest.raises(UnavailableError) as raised:
            client.route("faulty", tokens((2, 16), 10))
        assert raised.value.reason == "CIRCUIT_OPEN"
    still_open = breaker_stats(client)
    assert still_open.state == "OPEN"
    assert still_open.rejected_calls >= opened.rejected_calls + 3
    assert still_open.transitions == before.transitions + 1

    def degraded() -> None:
        routers = {r.router: r for r in client.health().routers}
        assert routers["faulty"].status == "DEGRADED"
        assert "circuit breaker" in routers["faulty"].detail
        assert routers["mixtral"].status == "SERVING"
        assert grpc_health(target, "moe_router.v1.RouterService/faulty") == NOT_SERVING
        assert grpc_health(target, "moe_router.v1.RouterService/mixtral") == SERVING
        assert grpc_health(target, "") == SERVING

    eventually(degraded)
    assert_still_serves(client)

    heal_breaker(client, fault_dir)
    healed = breaker_stats(client)
    assert healed.state == "CLOSED" and healed.transitions == before.transitions + 3

    def serving() -> None:
        routers = {r.router: r for r in client.health().routers}
        assert routers["faulty"].status == "SERVING" and routers["faulty"].detail == ""
        assert client.health().status == "SERVING"
        assert grpc_health(target, "moe_router.v1.RouterService/faulty") == SERVING

    eventually(serving)


def test_caller_errors_never_open_the_breaker(client):
    before = breaker_stats(client)
    assert before.state == "CLOSED"
    for i in range(20):
        if i % 2:
            with pytest.raises(InvalidArgumentError) as raised:
                client.route("faulty", tokens((2, 15), i))
            assert "dim 15 does not match router 'faulty' input_dim 16" in raised.value.details
        else:
            with pytest.raises(NotFoundError) as raised:
                client.route("faulty", tokens((2, 16), i), layer=3)
            assert "has no layer 3" in raised.value.details
    after = breaker_stats(client)
    assert after.state == "CLOSED" and after.failure_rate == 0.0
    assert after.transitions == before.transitions and after.rejected_calls == before.rejected_calls
    assert client.route("faulty", tokens((2, 16), 11)).expert_indices.shape == (2, 2)


# --------------------------------------------------------------------------- metrics
HISTOGRAMS = (
    "moe_router_request_duration_seconds",
    "moe_router_request_size_bytes",
    "moe_router_response_size_bytes",
    "moe_router_queue_time_seconds",
    "moe_router_compute_time_seconds",
    "moe_router_batch_size_tokens",
    "moe_router_batch_size_requests",
    "moe_router_experts_per_token",
)


def test_metrics_scrape_has_every_family_moving(served: Served, client, fault_dir):
    x = tokens((6, 64), 12)
    client.route("mixtral", x)
    assert client.route("mixtral", x).info.cache_hit
    client.route("deepseek", tokens((3, 32), 13))
    with pytest.raises(InvalidArgumentError):
        client.route("mixtral", tokens((2, 63), 14))
    trip_breaker(client, fault_dir)
    while_open = samples(scrape(served.server.metrics_port))
    heal_breaker(client, fault_dir)
    text = scrape(served.server.metrics_port)
    scraped = samples(text)

    assert value(while_open, "moe_router_breaker_state", router="faulty", state="open") == 1
    assert value(scraped, "moe_router_breaker_state", router="faulty", state="open") == 0
    assert value(scraped, "moe_router_breaker_state", router="mixtral", state="closed") == 1
    for old, new in (("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")):
        edge = {"router": "faulty", "from": old, "to": new}
        assert value(scraped, "moe_router_breaker_transitions_total", **edge) >= 1, edge

    requests = "moe_router_requests_total"
    assert value(scraped, requests, router="mixtral", code="OK") >= 2
    assert value(scraped, requests, router="mixtral", code="INVALID_ARGUMENT") >= 1
    assert value(scraped, requests, router="faulty", code="INTERNAL") >= 1
    assert value(scraped, requests, router="faulty", code="UNAVAILABLE") >= 1
    for name in HISTOGRAMS:
        assert value(scraped, f"{name}_count", router="mixtral") >= 1, name
        assert value(scraped, f"{name}_sum", router="mixtral") > 0, name
        assert value(scraped, f"{name}_bucket", router="mixtral", le="+Inf") >= 1, name
    assert value(scraped, "moe_router_tokens_routed_total", router="mixtral") >= 12
    per_expert = [
        value(scraped, "moe_router_expert_tokens_total", router="mixtral", layer="0", expert=str(e))
        for e in range(8)
    ]
    assert sum(per_expert) >= 2 * 12  # top-2 of at least 12 tokens, cache hits included
    assert value(scraped, "moe_router_in_flight_requests", router="mixtral") == 0
    assert value(scraped, "moe_router_queue_depth", router="mixtral") >= 0
    assert value(scraped, "moe_router_cache_hits_total", router="mixtral") >= 1
    assert value(scraped, "moe_router_cache_misses_total", router="mixtral") >= 1
    assert value(scraped, "moe_router_cache_evictions_total", router="mixtral") >= 0
    assert value(scraped, "moe_router_cache_bytes", router="mixtral") > 0
    assert value(scraped, "moe_router_cache_entries", router="mixtral") >= 1
    assert "# TYPE moe_router_rate_limited_total counter" in text  # no rate limit here
    assert 1 / 8 <= value(scraped, "moe_router_load_balance_score", router="mixtral") <= 1
    assert value(scraped, "moe_router_aux_loss", router="mixtral") > 0
    (build,) = scraped["moe_router_build_info"]
    assert build[1] == 1 and build[0]["device"] == "cpu"
    assert build[0]["torch_version"] == torch.__version__ and build[0]["grpc_version"]
    assert_still_serves(client)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_live_scrape(served: Served, client):
    client.route("mixtral", tokens((4, 64), 15))
    text = scrape(served.server.metrics_port)
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
