"""The device pool: the stdlib pool, growing on demand, with figures."""

from __future__ import annotations

import threading
import time

import pytest

from moe_router.chain.pool import DevicePool
from moe_router.errors import RouterConfigurationError


def test_pool_grows_on_demand_up_to_max_workers_and_counts_waiting_calls() -> None:
    pool = DevicePool(max_workers=4, min_workers=1)
    release = threading.Event()
    try:
        assert pool.stats().workers == 1
        futures = [pool.submit(release.wait, 30) for _ in range(6)]
        _eventually(lambda: pool.stats().workers == 4 and pool.stats().queue_depth == 2)
        release.set()
        assert all(f.result(timeout=30) for f in futures)
        _eventually(lambda: pool.stats().completed == 6)
        stats = pool.stats()
        assert stats.peak_workers == 4 and stats.max_workers == 4 and stats.queue_depth == 0
    finally:
        release.set()
        pool.shutdown()


def test_pool_without_autoscaling_starts_every_worker_at_once() -> None:
    pool = DevicePool(max_workers=3, autoscale=False)
    try:
        stats = pool.stats()
        assert stats.workers == 3 and stats.min_workers == 3 and not stats.enabled
    finally:
        pool.shutdown()


def test_pool_hands_exceptions_to_the_caller() -> None:
    pool = DevicePool(max_workers=2, autoscale=False)
    try:
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=30)
        assert pool.stats().workers == 2 and pool.stats().completed == 1
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(print)
    assert pool.stats().queue_depth == 0


@pytest.mark.parametrize("kwargs", [{"max_workers": 2, "min_workers": 3},
                                    {"max_workers": 0}, {"max_workers": 2, "min_workers": 0}])
def test_pool_rejects_bad_bounds(kwargs) -> None:
    with pytest.raises(RouterConfigurationError, match="workers"):
        DevicePool(**kwargs)


def _eventually(condition, timeout_s: float = 20.0) -> None:
    """Wait for a state the pool reaches on its own (not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)
