"""Dynamic batching: concurrent Route calls coalesced into one device pass.

Calls to the same router and layer with the same hidden dim and dtype wait in a queue
for at most ``max_queue_delay_us``; the queue is flushed as one device pass as soon as
it holds ``max_batch_tokens`` or the oldest call has waited long enough. Answers are
bit-identical to routing each call alone (``RouterBase.route_many_validated``). Calls
that cannot share a pass (token-coupled routers, capacity dropping, stateful or
stochastic routers, estimator inputs) run alone but still count against the queue
bound; a full queue answers ``OverloadedError`` (RESOURCE_EXHAUSTED).

A call that finds the device idle and its pass cheap enough to run on the event loop
runs at once, alone, unless its pass costs at least ``GATHER_MIN_PASS_S`` and other
calls are on their way: callbacks queued on the loop (the handlers of calls that arrived
while it was busy) or messages the doors are still reading (``calls_reading``). It then
waits for them, looking again at the end of each turn of the loop and for at most
``max_queue_delay_us``, and they share its pass. Without this, 16 callers of 1 token
never shared one: each call took a pass alone while the others waited behind it
(DeepSeek-V3 on 2 cores: 5,287 passes for 5,287 calls).

The batcher is a Backend over the narrow :class:`DevicePasses` interface: it admits a
call once and hands admitted calls to device passes; it knows nothing else of the device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moe_router.chain.backend import RouteCall, RouteResult
from moe_router.chain.device import AdmittedCall, PassAnswer
from moe_router.errors import DynamicMoEError, OverloadedError

__all__ = ["Batcher", "BatcherFigures", "DevicePasses"]

_Key = tuple[int, int, torch.dtype]


GATHER_MIN_PASS_S = 100e-6
"""Passes measured to cost less than this are not waited for: sharing one costs the
waiting call a queue entry, a future, a task and a few turns of the loop, more than a
pass of a few tokens through a narrow gate saves. Measured on 2 cores, 2 callers of
1-token Mixtral calls (passes of 20-40 us): 1,570-1,640 req/s running each at once,
1,340-1,460 gathered; DeepSeek-V3's passes of 300 us gain (module docstring)."""


def _loop_has_work_queued() -> bool:
    """Whether the running loop has callbacks queued for this turn (the handlers of other
    calls woken by the same read, mostly). Read from asyncio's ready queue, which
    ``BaseEventLoop`` has kept as ``_ready`` since Python 3.4 (a test pins it); a loop
    without one reads as False."""
    return bool(getattr(asyncio.get_running_loop(), "_ready", None))


class DevicePasses(Protocol):
    """What the batcher needs of a device: admit a call, run a pass of admitted calls."""

    name: str

    def admit(self, call: RouteCall) -> AdmittedCall:
        """Check ``call`` once (raises the caller's error) and say whether it may batch."""
        ...

    async def run_pass(self, admitted: Sequence[AdmittedCall]) -> list[PassAnswer]:
        """Route calls of one layer in one pass; a per-call refusal in its slot."""
        ...

    def runs_inline(self, tokens: int) -> bool:
        """Whether a pass of ``tokens`` tokens would run on the event loop right now."""
        ...

    def pass_cost_s(self, tokens: int) -> float:
        """The running mean cost (s) of a pass of ``tokens`` tokens; 0 if none ran yet."""
        ...

    def inline_size(self, tokens: int) -> bool:
        """Whether passes of ``tokens`` tokens are not known to be too costly to run on
        the event loop."""
        ...


@dataclass(frozen=True)
class BatcherFigures:
    """Queue depth now, device passes made and how many calls each carried on average."""

    queue_depth: int
    max_queue_size: int
    device_batches: int
    avg_calls_per_batch: float


@dataclass
class _Pending:
    admitted: AdmittedCall
    future: asyncio.Future[RouteResult]


class Batcher:
    """Backend that merges concurrent calls for one router before its device."""

    def __init__(
        self,
        device: DevicePasses,
        *,
        max_batch_tokens: int = 8192,
        max_queue_delay_us: int = 500,
        max_queue_size: int = 1024,
        on_batch: Callable[[int, int], None] | None = None,
        calls_reading: Callable[[], int] | None = None,
        gather_min_pass_s: float = GATHER_MIN_PASS_S,
    ) -> None:
        """``calls_reading``: how many calls the doors are reading now (module docstring);
        None: only callbacks queued on the loop say that calls are on their way.
        ``gather_min_pass_s``: the pass cost from which a call waits for them."""
        self.device = device
        self._gather_min_pass_s = gather_min_pass_s
        self._calls_reading = calls_reading
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queues: dict[_Key, list[_Pending]] = {}
        # per queue, its pending dispatch: after max_queue_delay_us, or (gathering) at the
        # end of this turn of the loop
        self._timers: dict[_Key, asyncio.Handle] = {}
        self._depth = 0
        self._passes_in_flight = 0
        self._batches = 0
        self._merged_calls = 0

    async def route(self, call: RouteCall) -> RouteResult:
        """Admit ``call``, queue it; resolve when its device pass is done."""
        admitted = self.device.admit(call)
        if self._depth >= self.max_queue_size:
            raise OverloadedError(
                f"router '{self.device.name}' queue is full ({self.max_queue_size} calls "
                "waiting); retry shortly or raise batching.max_queue_size",
                retry_after_s=max(self.max_queue_delay_s, 0.001) * 10,
                reason="QUEUE_FULL",
            )
        self._depth += 1
        try:
            if not admitted.batchable or admitted.num_tokens >= self.max_batch_tokens:
                return await self._run_alone(admitted)
            if (self._passes_in_flight == 0 and not self._queues
                    and self.device.runs_inline(admitted.num_tokens)):
                if (self.max_queue_delay_s <= 0
                        or self.device.pass_cost_s(admitted.num_tokens)
                        < self._gather_min_pass_s
                        or not self._company_coming()):
                    # Alone, or its pass cheaper than sharing it: route it now, on the
                    # loop, without a queue entry, a future or a task.
                    return await self._run_alone(admitted)
                # Other calls are on their way (module docstring): they join this one.
                return await self._enqueue(admitted, gather=True)
            return await self._enqueue(admitted)
        finally:
            self._depth -= 1

    async def _run_alone(self, admitted: AdmittedCall) -> RouteResult:
        (answer,) = await self.device.run_pass([admitted])
        admitted.call.after_answer.add(self._count_batch, 1, admitted.num_tokens)
        if isinstance(answer, DynamicMoEError):
            raise answer
        return answer

    async def _enqueue(self, admitted: AdmittedCall, *, gather: bool = False) -> RouteResult:
        key = admitted.batch_key
        loop = asyncio.get_running_loop()
        pending = _Pending(admitted, loop.create_future())
        self._queues.setdefault(key, []).append(pending)
        if gather and key not in self._timers:
            self._timers[key] = loop.call_soon(
                self._gather, key, loop.time() + self.max_queue_delay_s)
        else:
            # An idle device takes the call at once; a busy one (or a gathering queue)
            # lets calls gather.
            self._dispatch(key, full_only=self._passes_in_flight > 0 or key in self._timers)
        return await pending.future

    def _dispatch(self, key: _Key, *, full_only: bool, inline_only: bool = False) -> None:
        """Send the queue's calls to the device in batches of at most max_batch_tokens.

        With ``full_only`` (a pass is already running) only full batches go: the
        remainder waits for company until the running pass ends or, at most,
        ``max_queue_delay_us`` after its timer started. Otherwise everything goes, so a
        lone call on an idle device never waits for a timer. With ``inline_only`` (calls
        gathered for a pass on the loop) a batch also stops short of a size known to be
        too costly there: calls that each ran on the loop are not merged into a pass
        that would go to a worker thread.
        """
        queue = [p for p in self._queues.get(key, []) if not p.future.cancelled()]
        while queue:
            count, tokens = 0, 0
            while count < len(queue) and (
                count == 0
                or (tokens + queue[count].admitted.num_tokens <= self.max_batch_tokens
                    and (not inline_only or self.device.inline_size(
                        tokens + queue[count].admitted.num_tokens)))
            ):
                tokens += queue[count].admitted.num_tokens
                count += 1
            if full_only and count == len(queue) and tokens < self.max_batch_tokens:
                break  # not full yet: wait for company or the timer
            batch, queue = queue[:count], queue[count:]
            self._passes_in_flight += 1  # counted now: the task starts on a later tick
            asyncio.ensure_future(self._run_batch(batch, tokens))
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

    def _company_coming(self) -> bool:
        """Whether other calls will reach the batcher within a few turns of the loop: the
        loop has callbacks queued, or the doors are reading calls' messages."""
        return _loop_has_work_queued() or (
            self._calls_reading is not None and self._calls_reading() > 0)

    def _gather(self, key: _Key, deadline: float) -> None:
        """Dispatch the queue once no other call is on its way, or at ``deadline``;
        until then look again at the end of each turn of the loop. With nothing else
        queued on the loop (only messages being read) the turns follow one another at
        once: a poll, of at most ``max_queue_delay_us``, that catches a read the moment
        it completes."""
        loop = asyncio.get_running_loop()
        if loop.time() < deadline and self._company_coming():
            self._timers[key] = loop.call_soon(self._gather, key, deadline)
            return
        self._timers.pop(key, None)
        self._dispatch(key, full_only=False, inline_only=True)

    def _on_timer(self, key: _Key) -> None:
        self._timers.pop(key, None)
        self._dispatch(key, full_only=False)

    async def _run_batch(self, batch: list[_Pending], tokens: int) -> None:
        try:
            answers = await self.device.run_pass([p.admitted for p in batch])
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
        for p, answer in zip(batch, answers, strict=True):
            if p.future.done():
                continue
            if isinstance(answer, DynamicMoEError):  # refused on its own: only this call
                p.future.set_exception(answer)
            else:
                p.future.set_result(answer)

    def _count_batch(self, calls: int, tokens: int) -> None:
        self._batches += 1
        self._merged_calls += calls
        if self._on_batch is not None:
            self._on_batch(calls, tokens)

    def stats(self) -> BatcherFigures:
        """Queue depth and how many calls each device pass carried on average."""
        return BatcherFigures(
            queue_depth=self._depth,
            max_queue_size=self.max_queue_size,
            device_batches=self._batches,
            avg_calls_per_batch=self._merged_calls / self._batches if self._batches else 0.0,
        )
