"""Dynamic batching: concurrent Route calls coalesced into one device pass.

Calls to the same router and layer with the same hidden dim and dtype wait in a
queue for at most ``max_queue_delay_us``; the queue is flushed as one device pass as
soon as it holds ``max_batch_tokens`` or the oldest call has waited long enough.
Answers are bit-identical to routing each call alone (``RouterBase.route_many``).
Calls that cannot share a pass (token-coupled routers, capacity dropping, stateful or
stochastic routers, estimator inputs) run alone but still count against the queue
bound; a full queue answers ``OverloadedError`` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_router.chain.backend import RouteCall, RouteResult
from moe_router.errors import BackendError, OverloadedError
from moe_router.chain.device import DeviceExecutor
from moe_router.routing.output import RouterOutput

__all__ = ["Batcher"]

_Key = tuple[int, int, torch.dtype]


@dataclass
class _Pending:
    call: RouteCall
    future: asyncio.Future[RouteResult]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Backend that merges concurrent calls for one router before its DeviceExecutor."""

    def __init__(
        self,
        inner: DeviceExecutor,
        *,
        max_batch_tokens: int = 8192,
        max_queue_delay_us: int = 500,
        max_queue_size: int = 1024,
        on_batch: Callable[[int, int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.inner = inner
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._queues: dict[_Key, list[_Pending]] = {}
        self._timers: dict[_Key, asyncio.TimerHandle] = {}
        self._depth = 0
        self._passes_in_flight = 0
        self._batches = 0
        self._merged_calls = 0

    async def route(self, call: RouteCall) -> RouteResult:
        """Queue ``call``; resolve when its device pass is done."""
        self.inner.check(call)
        if self._depth >= self.max_queue_size:
            raise OverloadedError(
                f"router '{self.inner.name}' queue is full ({self.max_queue_size} calls "
                "waiting); retry shortly or raise batching.max_queue_size",
                retry_after_s=max(self.max_queue_delay_s, 0.001) * 10,
                reason="QUEUE_FULL",
            )
        self._set_depth(self._depth + 1)
        try:
            if not self.inner.batchable(call) or call.num_tokens >= self.max_batch_tokens:
                return await self._run_alone(call)
            return await self._enqueue(call)
        finally:
            self._set_depth(self._depth - 1)

    async def _run_alone(self, call: RouteCall) -> RouteResult:
        result = await self.inner.run_alone(call)
        self._count_batch(1, call.num_tokens)
        return result

    async def _enqueue(self, call: RouteCall) -> RouteResult:
        key = (call.layer, int(call.hidden_states.shape[-1]), call.hidden_states.dtype)
        pending = _Pending(call, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, []).append(pending)
        # An idle device takes the call at once; a busy one lets calls gather.
        self._dispatch(key, full_only=self._passes_in_flight > 0)
        return await pending.future

    def _dispatch(self, key: _Key, *, full_only: bool) -> None:
        """Send the queue's calls to the device in batches of at most max_batch_tokens.

        With ``full_only`` (a pass is already running) only full batches go: the
        remainder waits for company until the running pass ends or, at most,
        ``max_queue_delay_us`` after its timer started. Otherwise everything goes, so a
        lone call on an idle device never waits for a timer.
        """
        queue = [p for p in self._queues.get(key, []) if not p.future.cancelled()]
        while queue:
            count, tokens = 0, 0
            while count < len(queue) and (
                count == 0 or tokens + queue[count].call.num_tokens <= self.max_batch_tokens
            ):
                tokens += queue[count].call.num_tokens
                count += 1
            if full_only and count == len(queue) and tokens < self.max_batch_tokens:
                break  # not full yet: wait for company or the timer
            batch, queue = queue[:count], queue[count:]
            self._passes_in_flight += 1  # counted now: the task starts on a later tick
            asyncio.ensure_future(self._run_batch(key[0], batch, tokens))
        timer = self._timers.pop(key, None)
        if queue:
            self._queues[key] = queue
            self._timers[key] = timer or asyncio.get_running_loop().call_later(
                self.max_queue_delay_s, self._on_timer, key
            )
        else:
            self._queues.pop(key, None)
            if timer is not None:
                timer.cancel()

    def _on_timer(self, key: _Key) -> None:
        self._timers.pop(key, None)
        self._dispatch(key, full_only=False)

    async def _run_batch(self, layer: int, batch: list[_Pending], tokens: int) -> None:
        loop = asyncio.get_running_loop()
        calls = [p.call for p in batch]
        try:
            outcome = await loop.run_in_executor(
                self.inner.pool, self.inner.run_batch, layer, calls
            )
        except BaseException as exc:  # every waiter gets the failure, nothing is lost
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._passes_in_flight -= 1
            for waiting in list(self._queues):
                self._dispatch(waiting, full_only=self._passes_in_flight > 0)
        self._count_batch(len(batch), tokens)
        for p, output in zip(batch, outcome.outputs, strict=True):
            if p.future.done():
                continue
            if isinstance(output, RouterOutput):
                p.future.set_result(
                    self.inner.result(p.call, output, outcome, p.enqueued, len(batch), tokens)
                )
            else:  # refused on its own (deadline, non-finite input): only this call fails
                p.future.set_exception(output or BackendError("no answer"))

    def _count_batch(self, calls: int, tokens: int) -> None:
        self._batches += 1
        self._merged_calls += calls
        if self._on_batch is not None:
            self._on_batch(calls, tokens)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._on_queue_depth is not None:
            self._on_queue_depth(depth)

    def stats(self) -> dict[str, Any]:
        """Queue depth and how many calls each device pass carried on average."""
        stats = self.inner.stats()
        stats.update(
            queue_depth=self._depth,
            device_batches=self._batches,
            avg_calls_per_batch=self._merged_calls / self._batches if self._batches else 0.0,
        )
        return stats
