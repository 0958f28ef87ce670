"""A thread pool whose worker count follows its queue, for the in-process optimized router.

With ``autoscale`` the pool starts ``min_workers`` threads; a submitted call that finds
more queued calls than idle workers adds one (up to ``max_workers``), and a worker that
waits ``idle_timeout_s`` without work leaves (down to ``min_workers``). Without it the
pool runs ``max_workers`` threads for its whole life.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from moe_router.errors import RouterConfigurationError

__all__ = ["AutoscalingThreadPool"]

T = TypeVar("T")


class AutoscalingThreadPool(Executor):
    """Run callables on worker threads, growing and shrinking the pool with its queue.

    A ``concurrent.futures.Executor``, so the server's DeviceExecutor hands it to
    ``loop.run_in_executor`` exactly like the in-process optimized router uses it.
    """

    def __init__(
        self,
        *,
        max_workers: int,
        min_workers: int = 1,
        autoscale: bool = True,
        idle_timeout_s: float = 5.0,
        name: str = "moe-router-worker",
    ) -> None:
        for value, arg in ((max_workers, "max_workers"), (min_workers, "min_workers")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RouterConfigurationError(f"{arg}: must be a positive integer, got {value!r}")
        if min_workers > max_workers:
            raise RouterConfigurationError(
                f"min_workers: must be <= max_workers ({max_workers}), got {min_workers}"
            )
        if not idle_timeout_s > 0:
            raise RouterConfigurationError(f"idle_timeout_s: must be > 0, got {idle_timeout_s!r}")
        self._max = max_workers
        self._min = min_workers if autoscale else max_workers
        self._autoscale = autoscale
        self._idle_timeout = idle_timeout_s
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[tuple[Future[Any], Callable[..., Any], tuple, dict]] = deque()
        self._workers = self._idle = self._peak = 0
        self._scale_ups = self._scale_downs = self._completed = 0
        self._serial = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        with self._cond:
            for _ in range(self._min):
                self._spawn()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; its Future holds the result or the exception."""
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._queue.append((future, fn, args, kwargs))
            if self._autoscale and len(self._queue) > self._idle and self._workers < self._max:
                self._spawn()
                self._scale_ups += 1
            self._cond.notify()
        return future

    def stats(self) -> dict[str, Any]:
        """Workers now, bounds, idle workers, queue depth, peak, scale events, completed calls."""
        with self._cond:
            return {
                "enabled": self._autoscale,
                "workers": self._workers,
                "min_workers": self._min,
                "max_workers": self._max,
                "idle_workers": self._idle,
                "queue_depth": len(self._queue),
                "peak_workers": self._peak,
                "scale_ups": self._scale_ups,
                "scale_downs": self._scale_downs,
                "completed": self._completed,
            }

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop every worker (join them when ``wait``) after the queued calls, or after
        cancelling them when ``cancel_futures``."""
        with self._cond:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> None:
        """Start one worker (lock held)."""
        self._serial += 1
        thread = threading.Thread(target=self._work, name=f"{self._name}-{self._serial}",
                                  daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        self._workers += 1
        self._peak = max(self._peak, self._workers)
        thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                deadline = time.monotonic() + self._idle_timeout
                while not self._queue and not self._closed:
                    if not self._autoscale or self._workers <= self._min:
                        self._cond.wait()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._idle -= 1
                        self._workers -= 1
                        self._scale_downs += 1
                        return
                    self._cond.wait(remaining)
                self._idle -= 1
                if not self._queue:  # closed and drained
                    self._workers -= 1
                    return
                future, fn, args, kwargs = self._queue.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's Future
                    future.set_exception(exc)
            with self._cond:
                self._completed += 1
