"""CircuitBreakerBackend: resilience4j states on an injected clock, over a real router."""

from __future__ import annotations

import asyncio

import pytest
import torch
from chain_backends import FakeClock, FaultyBackend, TopKBackend, make_call

from moe_router.chain.breaker import BreakerFigures, BreakerState, CircuitBreakerBackend
from moe_router.errors import (
    AuthenticationError,
    BackendError,
    CircuitOpenError,
    DeadlineExceededError,
    NotFoundError,
    OverloadedError,
    RouterConfigurationError,
    RouterMemoryError,
    ValidationError,
)


class Scripted:
    """Fault source: pops the next planned outcome (None = real answer) for each call."""

    def __init__(self) -> None:
        self.plan: list[BaseException | None] = []

    def __call__(self, call):
        return self.plan.pop(0) if self.plan else None


def _breaker(clock: FakeClock, inner=None, events=None, **kwargs):
    faults = Scripted()
    inner = inner or FaultyBackend(faults)
    kwargs.setdefault("sliding_window_size", 10)
    kwargs.setdefault("minimum_number_of_calls", 4)
    kwargs.setdefault("wait_duration_s", 5.0)
    kwargs.setdefault("max_wait_duration_s", 12.0)
    breaker = CircuitBreakerBackend(
        inner, name="mixtral", clock=clock,
        on_state_change=(lambda *e: events.append(e)) if events is not None else None,
        **kwargs,
    )
    return breaker, inner, faults


async def _outcomes(breaker, n: int, call=None) -> list[object]:
    out = []
    for _ in range(n):
        try:
            out.append(await breaker.route(call or make_call()))
        except Exception as exc:
            out.append(exc)
    return out


def test_opens_when_failure_rate_reaches_threshold(clock: FakeClock) -> None:
    events: list = []
    breaker, inner, faults = _breaker(clock, events=events)
    faults.plan = [None, BackendError("x"), None, BackendError("x")]
    asyncio.run(_outcomes(breaker, 3))
    assert breaker.state.value == "CLOSED"  # 1 of 3 below the minimum of 4 calls
    asyncio.run(_outcomes(breaker, 1))
    assert breaker.state.value == "OPEN"
    assert events == [("mixtral", "CLOSED", "OPEN")]
    stats = breaker.stats()
    assert stats.failure_rate == 0.5 and stats.transitions == 1
    assert stats.retry_after_s == 5.0


def test_does_not_open_below_the_minimum_number_of_calls(clock: FakeClock) -> None:
    breaker, _, faults = _breaker(clock)
    faults.plan = [BackendError("x")] * 3
    asyncio.run(_outcomes(breaker, 3))
    assert breaker.state.value == "CLOSED"


def test_window_slides_over_the_last_n_calls(clock: FakeClock) -> None:
    breaker, _, faults = _breaker(clock, sliding_window_size=4, failure_rate_threshold=0.75)
    faults.plan = [BackendError("x"), BackendError("x"), None, None, None, BackendError("x")]
    asyncio.run(_outcomes(breaker, 6))
    # last four calls: None, None, None, F -> 0.25 (the two early failures slid out)
    assert breaker.state.value == "CLOSED"
    assert breaker.stats().failure_rate == 0.25
    faults.plan = [BackendError("x"), BackendError("x")]
    asyncio.run(_outcomes(breaker, 2))
    assert breaker.state.value == "OPEN"  # None, F, F, F -> 0.75


def test_open_rejects_at_once_with_time_left(clock: FakeClock) -> None:
    breaker, inner, faults = _breaker(clock)
    faults.plan = [BackendError("x")] * 4
    asyncio.run(_outcomes(breaker, 4))
    calls_before = inner.calls
    clock.advance(2.0)
    with pytest.raises(CircuitOpenError) as info:
        asyncio.run(breaker.route(make_call()))
    assert inner.calls == calls_before
    assert info.value.reason == "CIRCUIT_OPEN"
    assert info.value.retry_after_s == pytest.approx(3.0)
    assert "mixtral" in str(info.value)
    assert breaker.stats().rejected_calls == 1


def test_half_open_admits_exactly_the_permitted_probes_among_32_callers(
    clock: FakeClock,
) -> None:
    events: list = []
    failing = {"on": True}
    inner = FaultyBackend(lambda call: BackendError("boom") if failing["on"] else None)
    real = inner.real
    breaker = CircuitBreakerBackend(inner, name="mixtral", clock=clock, minimum_number_of_calls=1,
                                    on_state_change=lambda *e: events.append(e))
    asyncio.run(_outcomes(breaker, 1))
    assert breaker.state.value == "OPEN"
    failing["on"] = False
    clock.advance(5.0)

    async def run():
        real.gate = asyncio.Event()
        tasks = [asyncio.create_task(breaker.route(make_call())) for _ in range(32)]
        for _ in range(5):
            await asyncio.sleep(0)
        in_flight = real.calls
        real.gate.set()
        return in_flight, await asyncio.gather(*tasks, return_exceptions=True)

    in_flight, results = asyncio.run(run())
    assert in_flight == 3
    rejected = [r for r in results if isinstance(r, CircuitOpenError)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert len(rejected) == 29 and len(answered) == 3
    assert rejected[0].retry_after_s == pytest.approx(1.0)  # slow_call_duration_ms
    assert breaker.state.value == "CLOSED"
    assert [e[1:] for e in events] == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"),
                                      ("HALF_OPEN", "CLOSED")]
    torch.testing.assert_close(answered[0].output.expert_weights,
                               real.router(make_call().hidden_states).expert_weights)


def test_failed_probes_reopen_with_a_growing_capped_wait(clock: FakeClock) -> None:
    breaker, _, faults = _breaker(clock, minimum_number_of_calls=1,
                                  permitted_calls_in_half_open=2)
    faults.plan = [BackendError("x")]
    asyncio.run(_outcomes(breaker, 1))
    waits = []
    for _ in range(3):
        waits.append(breaker.stats().wait_duration_s)
        clock.advance(waits[-1])
        faults.plan = [BackendError("x"), None]  # one of two probes fails: 0.5 >= 0.5
        asyncio.run(_outcomes(breaker, 2))
        assert breaker.state.value == "OPEN"
    assert waits == [5.0, 10.0, 12.0]
    assert breaker.stats().wait_duration_s == 12.0
    clock.advance(12.0)
    asyncio.run(_outcomes(breaker, 2))  # both probes succeed
    assert breaker.state.value == "CLOSED"
    assert breaker.stats().wait_duration_s == 5.0


def test_state_read_moves_open_to_half_open_without_traffic(clock: FakeClock) -> None:
    breaker, _, faults = _breaker(clock, minimum_number_of_calls=1)
    faults.plan = [RouterMemoryError("oom")]
    asyncio.run(_outcomes(breaker, 1))
    clock.advance(4.9)
    assert breaker.stats().state == "OPEN"
    clock.advance(0.1)
    assert breaker.stats().state == "HALF_OPEN"


@pytest.mark.parametrize(
    "exc",
    [ValidationError("NaN"), NotFoundError("no layer 9"), AuthenticationError("key"),
     OverloadedError("queue full", 0.1, "QUEUE_FULL"), CircuitOpenError("inner open")],
)
def test_callers_own_errors_never_count(clock: FakeClock, exc: Exception) -> None:
    breaker, _, faults = _breaker(clock)
    faults.plan = [exc] * 20
    outcomes = asyncio.run(_outcomes(breaker, 20))
    assert all(type(o) is type(exc) for o in outcomes)
    assert breaker.state.value == "CLOSED"
    assert breaker.stats().buffered_calls == 0


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error"), TimeoutError(), RouterMemoryError("x"),
                                 BackendError("device")])
def test_backend_failures_count(clock: FakeClock, exc: Exception) -> None:
    breaker, _, faults = _breaker(clock)
    faults.plan = [exc] * 4
    asyncio.run(_outcomes(breaker, 4))
    assert breaker.state.value == "OPEN"


def test_deadline_counts_only_when_the_caller_gave_enough_time(clock: FakeClock) -> None:
    breaker, _, faults = _breaker(clock)
    faults.plan = [DeadlineExceededError("late")] * 4
    tight = make_call(deadline=clock() + 0.2)  # budget 0.2 s < slow_call_duration 1 s
    asyncio.run(_outcomes(breaker, 4, tight))
    assert breaker.stats().buffered_calls == 0
    faults.plan = [DeadlineExceededError("late")] * 4
    generous = make_call(deadline=clock() + 30.0)
    asyncio.run(_outcomes(breaker, 4, generous))
    assert breaker.state.value == "OPEN"


def test_slow_calls_open_the_circuit(clock: FakeClock) -> None:
    faults = Scripted()
    inner = FaultyBackend(faults, clock=clock, duration_s=0.25)
    breaker, _, _ = _breaker(clock, inner=inner, slow_call_duration_ms=200.0,
                             slow_call_rate_threshold=0.75)
    outcomes = asyncio.run(_outcomes(breaker, 4))
    assert all(not isinstance(o, Exception) for o in outcomes)
    assert breaker.state.value == "OPEN"
    assert breaker.stats().slow_call_rate == 1.0


def test_caller_error_in_half_open_hands_the_permit_back(clock: FakeClock) -> None:
    breaker, inner, faults = _breaker(clock, minimum_number_of_calls=1,
                                      permitted_calls_in_half_open=1)
    faults.plan = [BackendError("x")]
    asyncio.run(_outcomes(breaker, 1))
    clock.advance(5.0)
    faults.plan = [ValidationError("bad input")]
    outcomes = asyncio.run(_outcomes(breaker, 2))
    assert isinstance(outcomes[0], ValidationError)
    assert not isinstance(outcomes[1], Exception)  # the permit came back; the probe passed
    assert breaker.state.value == "CLOSED"


def test_stats_are_the_breakers_own_typed_figures(clock: FakeClock) -> None:
    breaker, _, faults = _breaker(clock)
    faults.plan = [None, BackendError("x")]
    asyncio.run(_outcomes(breaker, 2))
    stats = breaker.stats()
    assert isinstance(stats, BreakerFigures)
    assert stats.state is BreakerState.CLOSED and stats.buffered_calls == 2
    assert stats.failure_rate == 0.5 and stats.rejected_calls == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"sliding_window_size": 0}, "sliding_window_size"),
     ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
     ({"wait_duration_s": 10.0, "max_wait_duration_s": 5.0}, "max_wait_duration_s"),
     ({"wait_multiplier": 0.5}, "wait_multiplier"),
     ({"permitted_calls_in_half_open": 0}, "permitted_calls_in_half_open")],
)
def test_bad_arguments_fail_at_construction(kwargs, name) -> None:
    with pytest.raises(RouterConfigurationError, match=name):
        CircuitBreakerBackend(TopKBackend(), name="r", **kwargs)
