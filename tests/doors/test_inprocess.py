"""The seed's in-process wrappers over a real TopKRouter: same classes, two doors."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
import torch
from chain_backends import HIDDEN, FakeClock, make_router

from moe_router.errors import CircuitOpenError, RouterConfigurationError, ValidationError
from moe_router.inprocess import (
    create_cached_router,
    create_monitoring_wrapper,
    create_optimized_router,
)
from moe_router.routing import RouterConfig, TopKRouter


def _x(tokens: int = 6, seed: int = 0, *lead: int) -> torch.Tensor:
    shape = (*lead, HIDDEN) if lead else (tokens, HIDDEN)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_same(a, b) -> None:
    """Every field of two RouterOutputs bit-identical."""
    for field in dataclasses.fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, torch.Tensor):
            torch.testing.assert_close(left, right, rtol=0, atol=0, msg=field.name)
        elif field.name != "info":
            assert left == right, field.name


class FailingTopK(TopKRouter):
    """A real TopKRouter that raises a device-style error while ``failing`` is set."""

    failing = False

    def select(self, logits, hidden_states, generator=None, **kwargs: Any):
        if self.failing:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().select(logits, hidden_states, generator=generator, **kwargs)


# ------------------------------------------------------------------------------ cached
def test_cached_router_answers_like_the_router_and_counts_hits() -> None:
    router = make_router()
    cached = create_cached_router(router, cache_size=10)
    try:
        x = _x()
        first, second = cached.route(x), cached.route(x)
        with torch.no_grad():
            _assert_same(first, router(x))
        _assert_same(second, first)
        stats = cached.get_cache_stats()
        assert list(stats) == ["size", "max_size", "hit_count", "miss_count", "hit_rate",
                               "ttl_seconds"]
        assert (stats["size"], stats["hit_count"], stats["miss_count"]) == (1, 1, 1)
        assert stats["hit_rate"] == 0.5 and stats["max_size"] == 10
        cached.clear_cache()
        assert cached.get_cache_stats()["size"] == 0
    finally:
        cached.close()


def test_changing_a_returned_answer_does_not_change_the_cache() -> None:
    cached = create_cached_router(make_router())
    try:
        x = _x()
        first = cached.route(x)
        expected = first.expert_weights.clone()
        first.expert_weights.zero_()
        torch.testing.assert_close(cached.route(x).expert_weights, expected)
    finally:
        cached.close()


def test_new_weights_are_never_answered_from_the_old_cache() -> None:
    router = make_router()
    cached = create_cached_router(router)
    try:
        x = _x()
        cached.route(x)
        with torch.no_grad():
            router.gate.weight.copy_(torch.flip(router.gate.weight, dims=[0]))
        after = cached.route(x)
        assert cached.get_cache_stats()["hit_count"] == 0
        with torch.no_grad():
            _assert_same(after, router(x))
    finally:
        cached.close()


def test_noisy_router_is_cached_only_with_a_seed() -> None:
    torch.manual_seed(0)
    router = TopKRouter(RouterConfig(hidden_size=HIDDEN, num_experts=8, top_k=2,
                                     jitter_noise=0.5)).train()
    cached = create_cached_router(router)
    try:
        x = _x()
        cached.route(x)
        cached.route(x)
        assert cached.get_cache_stats()["hit_count"] == 0
        seeded = cached.route(x, seed=11)
        again = cached.route(x, seed=11)
        assert cached.get_cache_stats()["hit_count"] == 1
        _assert_same(again, seeded)
        with torch.no_grad():
            direct = router(x, generator=torch.Generator().manual_seed(11))
        _assert_same(seeded, direct)
    finally:
        cached.close()


def test_cached_router_works_inside_a_running_event_loop() -> None:
    cached = create_cached_router(make_router())

    async def inside():
        return cached.route(_x(2, 0, 2, 3))  # [B, S, D]

    try:
        out = asyncio.run(inside())
        assert out.expert_indices.shape == (2, 3, 2)
    finally:
        cached.close()


# ------------------------------------------------------------------------------ monitored
def test_monitoring_summary_has_exactly_the_seed_keys_and_real_figures() -> None:
    router = make_router()
    monitored = create_monitoring_wrapper(router, alert_thresholds={"error_rate": 0.4})
    try:
        outs = [monitored.route(_x(6, s)) for s in range(3)]
        with pytest.raises(ValidationError):
            monitored.route(torch.randn(2, HIDDEN + 2))
        summary = monitored.get_monitoring_summary()
        assert list(summary) == ["performance", "health", "circuit_breaker_state"]
        perf = summary["performance"]
        assert perf["total_calls"] == 4 and perf["failed_calls"] == 1
        assert perf["calls_by_code"] == {"INVALID_ARGUMENT": 1, "OK": 3}
        # A caller's bad input is an error but not a failure of ours (as on the server).
        assert perf["error_rate"] == 0.0 and perf["avg_latency_ms"] > 0
        load = sum(o.tokens_per_expert for o in outs)
        assert perf["tokens_per_expert"] == load.tolist()
        share = load.double() / 36  # each expert's share of the 18 x top-2 assignments
        assert perf["load_balance_variance"] == pytest.approx(float(share.var(unbiased=False)))
        health = summary["health"]
        assert set(health) == {"avg_latency_ms", "error_rate", "load_balance_variance",
                               "memory_usage_mb"}
        assert health["error_rate"] == {"ok": True, "value": 0.0, "threshold": 0.4}
        assert summary["circuit_breaker_state"] == "CLOSED"
    finally:
        monitored.close()


def test_crossed_thresholds_mark_checks_failed() -> None:
    torch.manual_seed(0)
    router = FailingTopK(RouterConfig(hidden_size=HIDDEN, num_experts=8, top_k=2)).eval()
    monitored = create_monitoring_wrapper(router, enable_circuit_breaker=False,
                                          alert_thresholds={
        "error_rate": 0.1, "avg_latency_ms": 0.0, "memory_usage_mb": 1e9,
        "load_balance_variance": 1.0})
    try:
        assert monitored.get_monitoring_summary()["health"]["error_rate"]["value"] is None
        monitored.route(_x())
        router.failing = True
        with pytest.raises(RuntimeError):
            monitored.route(_x())
        router.failing = False
        health = monitored.get_monitoring_summary()["health"]
        assert health["error_rate"]["ok"] is False and health["error_rate"]["value"] == 0.5
        assert health["avg_latency_ms"]["ok"] is False
        assert health["memory_usage_mb"]["ok"] is True
        assert health["load_balance_variance"]["ok"] is True
    finally:
        monitored.close()


def test_monitoring_breaker_opens_on_device_failures() -> None:
    torch.manual_seed(0)
    router = FailingTopK(RouterConfig(hidden_size=HIDDEN, num_experts=8, top_k=2)).eval()
    clock = FakeClock()
    changes: list = []
    monitored = create_monitoring_wrapper(
        router, minimum_number_of_calls=2, clock=clock, name="flaky",
        on_state_change=lambda *e: changes.append(e))
    try:
        router.failing = True
        for _ in range(2):
            with pytest.raises(RuntimeError):
                monitored.route(_x())
        assert monitored.get_monitoring_summary()["circuit_breaker_state"] == "OPEN"
        with pytest.raises(CircuitOpenError):
            monitored.route(_x())
        router.failing = False
        clock.advance(5.0)
        for _ in range(3):
            monitored.route(_x())
        summary = monitored.get_monitoring_summary()
        assert summary["circuit_breaker_state"] == "CLOSED"
        assert summary["performance"]["calls_by_code"] == {
            "INTERNAL": 2, "UNAVAILABLE": 1, "OK": 3}
        assert [c[1:] for c in changes] == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"),
                                           ("HALF_OPEN", "CLOSED")]
        assert monitored.registry.get_sample_value(
            "moe_router_breaker_transitions_total",
            {"router": "flaky", "from": "CLOSED", "to": "OPEN"}) == 1
    finally:
        monitored.close()


def test_monitoring_without_breaker_and_caller_grad_mode() -> None:
    monitored = create_monitoring_wrapper(make_router(), enable_circuit_breaker=False)
    try:
        assert monitored.get_monitoring_summary()["circuit_breaker_state"] == "DISABLED"
        with torch.enable_grad():
            assert monitored.route(_x()).expert_weights.requires_grad
        with torch.no_grad():
            assert not monitored.route(_x()).expert_weights.requires_grad
    finally:
        monitored.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"alert_threshold": {}}, {"alert_thresholds": {"latency": 1.0}},
     {"alert_thresholds": {"error_rate": -1}}, {"sliding_window_size": 0}],
)
def test_monitoring_rejects_unknown_or_bad_arguments(kwargs) -> None:
    with pytest.raises(RouterConfigurationError):
        create_monitoring_wrapper(make_router(), **kwargs)


# ------------------------------------------------------------------------------ optimized
@pytest.mark.parametrize("lead", [(64,), (4, 16)])
def test_parallel_split_is_identical_to_one_call(lead) -> None:
    router = make_router()
    optimized = create_optimized_router(router, max_workers=4, min_tokens_per_split=8)
    try:
        x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            split = optimized.route(x)
            whole = router(x)
        _assert_same(split, whole)
        assert optimized.get_optimization_stats()["performance"]["split_calls"] == 1
    finally:
        optimized.close()


def test_token_coupled_routers_are_not_split() -> None:
    torch.manual_seed(0)
    router = TopKRouter(RouterConfig(hidden_size=HIDDEN, num_experts=8, top_k=2,
                                     capacity_factor=1.0)).eval()
    optimized = create_optimized_router(router, min_tokens_per_split=8)
    try:
        x = _x(64, 5)
        with torch.no_grad():
            _assert_same(optimized.route(x), router(x))
        assert optimized.get_optimization_stats()["performance"]["split_calls"] == 0
    finally:
        optimized.close()


def test_optimization_stats_have_exactly_the_seed_keys() -> None:
    optimized = create_optimized_router(make_router(), enable_autoscaling=False, max_workers=2)
    try:
        optimized.route(_x())
        with pytest.raises(ValidationError):
            optimized.route(torch.randn(3, HIDDEN + 1))
        stats = optimized.get_optimization_stats()
        assert list(stats) == ["performance", "autoscaler", "memory_pool"]
        assert stats["performance"]["total_calls"] == 2
        assert stats["performance"]["failed_calls"] == 1
        assert stats["performance"]["tokens_routed"] == 6
        assert stats["autoscaler"]["workers"] == 2 and not stats["autoscaler"]["enabled"]
        assert stats["memory_pool"]["device"] == "cpu" and stats["memory_pool"]["rss_bytes"] > 0
    finally:
        optimized.close()


def test_optimized_router_rejects_unknown_scaling_arguments() -> None:
    with pytest.raises(RouterConfigurationError, match="scaling_kwargs"):
        create_optimized_router(make_router(), queue_size=3)


def _eventually(condition, timeout_s: float = 20.0) -> None:
    """Wait for a state the pool reaches on its own (not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)
