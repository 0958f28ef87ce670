"""Circuit breaker stage: when a router's backend keeps failing, fail fast instead of queueing.

States and transitions as resilience4j defines them, with a count-based sliding window:

    CLOSED ──(failure or slow-call rate >= threshold over the last N calls)──> OPEN
    OPEN ──(wait elapsed; checked on the next call or stats read)──> HALF_OPEN
    HALF_OPEN ──(the permitted probe calls are all in; rates under thresholds)──> CLOSED
    HALF_OPEN ──(rates at or over a threshold)──> OPEN, wait x wait_multiplier (capped)

What counts as a failure: any exception that says the backend is broken (BackendError,
RouterMemoryError, ComplexityEstimationError, ..., and any foreign exception such as a
torch RuntimeError or an executor timeout). What never counts (the call is forgotten, and
a half-open probe permit is handed back): the caller's own errors (ValidationError and
NotFoundError, AuthenticationError), load shedding (OverloadedError, DrainingError,
CircuitOpenError from a stage below), cancellation, and a DeadlineExceededError when the
call's own budget (deadline minus admission time) was shorter than
``slow_call_duration_ms``: a deadline that tight is the caller's choice, not the
backend's fault. Calls admitted before a transition do not count after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from moe_router.chain.backend import Backend, RouteCall, RouteResult
from moe_router.errors import (
    NOT_OUR_FAULT,
    CircuitOpenError,
    DeadlineExceededError,
    RouterConfigurationError,
)

__all__ = ["BreakerFigures", "BreakerState", "CircuitBreakerBackend", "counts_as_failure"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BreakerFigures:
    """The breaker now: its state, the window's rates, and what it refused."""

    state: BreakerState
    failure_rate: float
    slow_call_rate: float
    buffered_calls: int
    rejected_calls: int
    transitions: int
    retry_after_s: float
    wait_duration_s: float


class BreakerState(str, Enum):
    """Circuit breaker state; the value is what stats and logs show."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


def counts_as_failure(exc: BaseException, call: RouteCall, admitted_at: float,
                      slow_call_duration_s: float) -> bool:
    """True when ``exc`` says the backend is failing (the rule in the module docstring)."""
    if isinstance(exc, NOT_OUR_FAULT):
        return False
    if isinstance(exc, DeadlineExceededError):
        return call.deadline is None or call.deadline - admitted_at >= slow_call_duration_s
    return True


class CircuitBreakerBackend:
    """A Backend that stops calling a failing inner backend for a while (see module doc).

    OPEN and full HALF_OPEN reject with ``CircuitOpenError(reason="CIRCUIT_OPEN")``:
    while OPEN its ``retry_after_s`` is the time left of the wait; in HALF_OPEN, once the
    ``permitted_calls_in_half_open`` probes are taken, it is ``slow_call_duration_ms``
    (by then the probes should have answered). ``call.deadline`` is read on ``clock``'s
    timeline (``time.monotonic`` in production). ``on_state_change(name, old, new)`` is
    called after every transition with the state values (``"CLOSED"`` ...).
    """

    def __init__(
        self,
        inner: Backend,
        *,
        name: str,
        sliding_window_size: int = 100,
        minimum_number_of_calls: int = 10,
        failure_rate_threshold: float = 0.5,
        slow_call_rate_threshold: float = 1.0,
        slow_call_duration_ms: float = 1000.0,
        wait_duration_s: float = 5.0,
        max_wait_duration_s: float = 60.0,
        wait_multiplier: float = 2.0,
        permitted_calls_in_half_open: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str, str, str], None] | None = None,
    ) -> None:
        _positive_int(sliding_window_size, "sliding_window_size")
        _positive_int(minimum_number_of_calls, "minimum_number_of_calls")
        _positive_int(permitted_calls_in_half_open, "permitted_calls_in_half_open")
        _rate(failure_rate_threshold, "failure_rate_threshold")
        _rate(slow_call_rate_threshold, "slow_call_rate_threshold")
        _positive(slow_call_duration_ms, "slow_call_duration_ms")
        _positive(wait_duration_s, "wait_duration_s")
        if not max_wait_duration_s >= wait_duration_s:
            raise RouterConfigurationError(
                f"max_wait_duration_s: must be >= wait_duration_s ({wait_duration_s}), "
                f"got {max_wait_duration_s!r}"
            )
        if not wait_multiplier >= 1.0:
            raise RouterConfigurationError(
                f"wait_multiplier: must be >= 1.0, got {wait_multiplier!r}"
            )
        self._inner = inner
        self.name = name
        self._min_calls = min(minimum_number_of_calls, sliding_window_size)
        self._failure_threshold = failure_rate_threshold
        self._slow_threshold = slow_call_rate_threshold
        self._slow_s = slow_call_duration_ms / 1000.0
        self._base_wait = wait_duration_s
        self._max_wait = max_wait_duration_s
        self._multiplier = wait_multiplier
        self._permitted = permitted_calls_in_half_open
        self._clock = clock
        self._on_state_change = on_state_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._epoch = 0  # bumps at every transition; outcomes of older calls are ignored
        self._window: deque[tuple[bool, bool]] = deque(maxlen=sliding_window_size)
        self._window_failures = self._window_slow = 0
        self._probes: list[tuple[bool, bool]] = []
        self._permits_left = 0
        self._wait = wait_duration_s
        self._opened_at = 0.0
        self._opened_rates = (0.0, 0.0)
        self._rejected = 0
        self._transitions = 0

    # ------------------------------------------------------------------ Backend
    async def route(self, call: RouteCall) -> RouteResult:
        """Pass the call on unless the circuit is open; record how it went."""
        epoch = self._acquire()
        admitted_at = self._clock()
        try:
            result = await self._inner.route(call)
        except asyncio.CancelledError:
            self._release(epoch)
            raise
        except Exception as exc:
            slow = self._clock() - admitted_at >= self._slow_s
            if counts_as_failure(exc, call, admitted_at, self._slow_s):
                self._record(epoch, failed=True, slow=slow)
            else:
                self._release(epoch)
            raise
        slow = self._clock() - admitted_at >= self._slow_s
        call.after_answer.add(self._record_answer, epoch, slow)
        return result

    def stats(self) -> BreakerFigures:
        """State, failure and slow-call rates, rejected calls, transitions, retry delay."""
        self._notify(self._refresh())
        with self._lock:
            if self._state is BreakerState.OPEN:
                failure_rate, slow_rate = self._opened_rates
                retry_after = max(0.0, self._opened_at + self._wait - self._clock())
            else:
                failure_rate, slow_rate = (
                    _rates(self._probes)
                    if self._state is BreakerState.HALF_OPEN
                    else self._window_rates()
                )
                retry_after = 0.0
            return BreakerFigures(
                state=self._state,
                failure_rate=failure_rate,
                slow_call_rate=slow_rate,
                buffered_calls=len(self._window),
                rejected_calls=self._rejected,
                transitions=self._transitions,
                retry_after_s=retry_after,
                wait_duration_s=self._wait,
            )

    # ------------------------------------------------------------------ breaker
    @property
    def state(self) -> BreakerState:
        """The current state (an elapsed OPEN wait turns into HALF_OPEN on reading)."""
        self._notify(self._refresh())
        return self._state

    # ------------------------------------------------------------------ internals
    def _acquire(self) -> int:
        """Admit a call (returning the epoch it belongs to) or raise CircuitOpenError."""
        events = self._refresh()
        try:
            with self._lock:
                if self._state is BreakerState.CLOSED:
                    return self._epoch
                if self._state is BreakerState.HALF_OPEN and self._permits_left > 0:
                    self._permits_left -= 1
                    return self._epoch
                self._rejected += 1
                if self._state is BreakerState.OPEN:
                    retry_after = max(0.0, self._opened_at + self._wait - self._clock())
                    detail = f"open after failures; retry in {retry_after:.2f}s"
                else:
                    retry_after = self._slow_s
                    detail = "half-open and its probe calls are taken"
        finally:
            self._notify(events)
        raise CircuitOpenError(
            f"router {self.name!r} circuit breaker is {detail}",
            retry_after_s=retry_after,
            reason="CIRCUIT_OPEN",
        )

    def _release(self, epoch: int) -> None:
        """Forget an admitted call that says nothing about the backend (hand back its permit)."""
        with self._lock:
            if epoch == self._epoch and self._state is BreakerState.HALF_OPEN:
                self._permits_left += 1

    def _record_answer(self, epoch: int, slow: bool) -> None:
        """Record a call answered (after its answer has been sent: ``call.after_answer``)."""
        self._record(epoch, failed=False, slow=slow)

    def _record(self, epoch: int, *, failed: bool, slow: bool) -> None:
        events: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            if epoch != self._epoch:
                return
            if self._state is BreakerState.CLOSED:
                self._append_to_window(failed, slow)
                rates = self._window_rates()
                if len(self._window) >= self._min_calls and self._over(rates):
                    self._opened_rates = rates
                    events.append(self._transition(BreakerState.OPEN))
            elif self._state is BreakerState.HALF_OPEN:
                self._probes.append((failed, slow))
                if len(self._probes) >= self._permitted:
                    rates = _rates(self._probes)
                    if self._over(rates):
                        self._wait = min(self._wait * self._multiplier, self._max_wait)
                        self._opened_rates = rates
                        events.append(self._transition(BreakerState.OPEN))
                    else:
                        self._wait = self._base_wait
                        events.append(self._transition(BreakerState.CLOSED))
        self._notify(events)

    def _append_to_window(self, failed: bool, slow: bool) -> None:
        """Add an outcome to the count-based window, keeping its running sums."""
        if len(self._window) == self._window.maxlen:
            old_failed, old_slow = self._window[0]
            self._window_failures -= old_failed
            self._window_slow -= old_slow
        self._window.append((failed, slow))
        self._window_failures += failed
        self._window_slow += slow

    def _window_rates(self) -> tuple[float, float]:
        total = len(self._window)
        if total == 0:
            return 0.0, 0.0
        return self._window_failures / total, self._window_slow / total

    def _refresh(self) -> list[tuple[BreakerState, BreakerState]]:
        """OPEN -> HALF_OPEN once the wait has passed."""
        with self._lock:
            if (
                self._state is BreakerState.OPEN
                and self._clock() >= self._opened_at + self._wait
            ):
                return [self._transition(BreakerState.HALF_OPEN)]
        return []

    def _over(self, rates: tuple[float, float]) -> bool:
        failure_rate, slow_rate = rates
        return failure_rate >= self._failure_threshold or slow_rate >= self._slow_threshold

    def _transition(self, new: BreakerState) -> tuple[BreakerState, BreakerState]:
        """Move to ``new`` (lock held); returns the event to notify after unlocking."""
        old = self._state
        self._state = new
        self._epoch += 1
        self._transitions += 1
        self._window.clear()
        self._window_failures = self._window_slow = 0
        self._probes = []
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        elif new is BreakerState.HALF_OPEN:
            self._permits_left = self._permitted
        return old, new

    def _notify(self, events: Sequence[tuple[BreakerState, BreakerState]]) -> None:
        for old, new in events:
            log.warning("circuit breaker %r: %s -> %s", self.name, old.value, new.value)
            if self._on_state_change is not None:
                self._on_state_change(self.name, old.value, new.value)


def _rates(outcomes: Sequence[tuple[bool, bool]]) -> tuple[float, float]:
    """(failure rate, slow-call rate) of recorded outcomes; 0 when there are none."""
    total = len(outcomes)
    if total == 0:
        return 0.0, 0.0
    failures = sum(1 for failed, _ in outcomes if failed)
    slow = sum(1 for _, was_slow in outcomes if was_slow)
    return failures / total, slow / total


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterConfigurationError(f"{name}: must be a positive integer, got {value!r}")


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise RouterConfigurationError(f"{name}: must be > 0, got {value!r}")


def _rate(value: float, name: str) -> None:
    if not 0.0 < value <= 1.0:
        raise RouterConfigurationError(f"{name}: must be in (0, 1], got {value!r}")
