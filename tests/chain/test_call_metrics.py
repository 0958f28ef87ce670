"""The per-call families kept as plain counts expose what prometheus_client's own
Histogram and Counter expose for the same observations, and a scrape during traffic never
sees a count go down or a histogram whose _count is not its +Inf bucket."""

from __future__ import annotations

import random
import threading

from prometheus_client import CollectorRegistry, Histogram

from moe_router.chain.call_metrics import LATENCY_BUCKETS, SIZE_BUCKETS, CallMetricsCollector


def _samples(registry: CollectorRegistry, family: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect() if metric.name == family for s in metric.samples}


def test_histograms_match_prometheus_client_bit_for_bit() -> None:
    rng = random.Random(0)
    values = [rng.choice(LATENCY_BUCKETS) for _ in range(200)]  # exactly on a bound: in it
    values += [rng.uniform(0, 12.0) for _ in range(500)]  # past the last bound too
    values += [rng.lognormvariate(-7, 2) for _ in range(500)] + [0.0]
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    collector = CallMetricsCollector()
    ours_registry.register(collector)
    reference = Histogram("moe_router_request_duration_seconds", "x", ["router"],
                          buckets=LATENCY_BUCKETS, registry=reference_registry)
    series = collector.series("mixtral")
    for value in values:
        series.request_duration.observe(value)
        reference.labels("mixtral").observe(value)
    ours = _samples(ours_registry, "moe_router_request_duration_seconds")
    theirs = {k: v for k, v in _samples(reference_registry,
                                        "moe_router_request_duration_seconds").items()
              if not k[0].endswith("_created")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == value, key  # the sums add in the same order: equal floats


def test_codes_tokens_and_in_flight_are_counted_per_router() -> None:
    registry = CollectorRegistry()
    collector = CallMetricsCollector()
    registry.register(collector)
    a, b = collector.series("a"), collector.series("b")
    assert collector.series("a") is a
    a.codes["OK"] += 3
    a.codes["INVALID_ARGUMENT"] = 1
    a.tokens_routed += 7
    b.in_flight += 2
    value = registry.get_sample_value
    assert value("moe_router_requests_total", {"router": "a", "code": "OK"}) == 3
    assert value("moe_router_requests_total", {"router": "a", "code": "INVALID_ARGUMENT"}) == 1
    assert value("moe_router_requests_total", {"router": "b", "code": "OK"}) == 0
    assert value("moe_router_tokens_routed_total", {"router": "a"}) == 7
    assert value("moe_router_in_flight_requests", {"router": "b"}) == 2
    assert value("moe_router_request_size_bytes_count", {"router": "b"}) == 0


def test_the_families_exist_before_any_router_is_seen() -> None:
    registry = CollectorRegistry()
    registry.register(CallMetricsCollector())
    names = {metric.name for metric in registry.collect()}
    assert {"moe_router_requests", "moe_router_request_duration_seconds",
            "moe_router_batch_size_tokens", "moe_router_in_flight_requests"} <= names


def test_a_scrape_during_traffic_sees_consistent_monotonic_counts() -> None:
    registry = CollectorRegistry()
    collector = CallMetricsCollector()
    registry.register(collector)
    series = collector.series("r")
    stop = threading.Event()

    def traffic() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            series.request_size.observe(rng.choice(SIZE_BUCKETS) * rng.random() * 2)

    writer = threading.Thread(target=traffic)
    writer.start()
    try:
        previous: dict[str, float] = {}
        for _ in range(300):
            buckets = {s.labels["le"]: s.value for metric in registry.collect()
                       for s in metric.samples
                       if s.name == "moe_router_request_size_bytes_bucket"}
            count = registry.get_sample_value("moe_router_request_size_bytes_count",
                                              {"router": "r"})
            values = list(buckets.values())
            assert values == sorted(values)  # cumulative
            for le, value in buckets.items():
                assert value >= previous.get(le, 0.0)
            assert count is not None and count >= buckets["+Inf"]  # read after the buckets
            previous = buckets
    finally:
        stop.set()
        writer.join()
    final = registry.get_sample_value("moe_router_request_size_bytes_bucket",
                                      {"router": "r", "le": "+Inf"})
    assert final == registry.get_sample_value("moe_router_request_size_bytes_count",
                                              {"router": "r"})
