"""Admission control of the calls one server holds at once, and its drain.

gRPC's own ``maximum_concurrent_rpcs`` refuses overload with a bare "Concurrent RPC limit
exceeded!": no reason, no retry delay. The calls of every door (Route and RouteStream,
ModelInfer and ModelStreamInfer, the co-located door's ROUTE) are admitted here instead,
in two steps, so that every refusal is RESOURCE_EXHAUSTED with ErrorInfo reason
``SERVER_OVERLOADED`` and a RetryInfo delay, and so that the drain holds every call a
door has accepted:

- :meth:`Admission.enter`, when the call starts and before its message is read: at most
  ``max_calls`` calls held at once, and room in ``max_bytes`` for the message it will
  bring, reserved at the size recent messages had (a maximum that halves every 5 s of
  smaller messages). A refused call's message is read no further than the transport's
  read-ahead: gRPC reads the rest only when the handler asks for it (the server turns
  HTTP/2's BDP probing off and bounds the read-ahead to ``server.read_ahead_bytes`` a
  call, 1 MiB by default), so 40 callers of 8 MiB cannot all be read at once into a
  64 MiB budget;
- :meth:`Admission.read_turn`, before the handler reads: at most :data:`MAX_READERS`
  calls read their message at once; the others wait for a turn, first come first
  served, their message no further read than the read-ahead. They used to be refused
  SERVER_OVERLOADED, which 32 concurrent callers of small calls met without any memory
  at stake (3-83 of about 6,500 tritonclient calls of 16 tokens in 4 s at 32 callers,
  none of whose clients retry such a refusal; ``scripts/measure_oip_batching.py``);
- :meth:`Admission.add_bytes`, once the message is read: its true size replaces the
  reservation, and a call that then passes ``max_bytes`` is refused (a call alone is
  always admitted, so a message up to ``server.max_message_bytes`` still passes on an
  idle server).

Unary gRPC calls (Route, ModelInfer) run as stream-unary handlers so that they are
admitted before their message is read (:meth:`Admission.read_admitted`). A co-located call's
message is a datagram already read: it is admitted with its size at once
(:meth:`Admission.enter_read`).

The retry delay is the recent mean time a call was held (an EWMA): by then, on average,
one held call has left. The same object drains the server: :meth:`close` refuses every
new call with UNAVAILABLE ``DRAINING`` (retriable: the client's retry policy sends it to
another replica, after a delay by which this replica is gone: :attr:`drain_retry_after_s`)
and :meth:`wait_idle` waits for the held calls. Everything runs on the
event loop; no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from moe_router.errors import DrainingError, OverloadedError, ValidationError

__all__ = ["MAX_READERS", "Admission", "AdmissionFigures", "Ticket"]

_MIN_RETRY_S = 0.005
_MIN_DRAIN_RETRY_S = 0.25
_MAX_RETRY_S = 1.0
_EWMA_WEIGHT = 0.1
_MIN_RESERVATION = 4096  # bytes reserved for a message before any was seen

MAX_READERS = 16
"""Most calls reading their message at once (the others wait their turn). The reservation
can only guess a message's size; this bounds what a burst of unexpectedly large ones
brings in (16 messages)."""
_RESERVATION_HALF_LIFE_S = 5.0  # a large message is expected again for some seconds


@dataclass(frozen=True)
class AdmissionFigures:
    """Calls and request bytes held now, their bounds, and what was refused so far."""

    calls: int
    max_calls: int
    bytes: int
    max_bytes: int
    refused: int
    draining: bool


class Ticket:
    """One admitted call: release it exactly once (``with`` does)."""

    __slots__ = ("_admission", "_started", "nbytes", "reading", "turn", "_released")

    def __init__(self, admission: Admission, started: float) -> None:
        self._admission = admission
        self._started = started
        self.nbytes = 0
        self.reading = True  # until its message's size is known (add_bytes)
        # True while it holds one of the MAX_READERS read turns; a future while it waits
        # for one (Admission.read_turn)
        self.turn: bool | asyncio.Future[None] = False
        self._released = False

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the call's slot and bytes back (idempotent)."""
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    """Bounds the calls held at once and their request bytes (module docstring)."""

    def __init__(
        self, max_calls: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self._clock = clock
        self._calls = 0
        self._readers = 0  # admitted, message not read yet (waiting for a turn or reading)
        self._turns_taken = 0  # reading their message now, at most MAX_READERS
        self._turn_queue: deque[Ticket] = deque()
        self._bytes = 0
        self._refused = 0
        self._held_s = _MIN_RETRY_S
        self._expected_bytes = float(_MIN_RESERVATION)
        self._expected_at = clock()
        self._draining = False
        self._idle: asyncio.Event | None = None

    def enter(self) -> Ticket:
        """Admit a call that is starting (its message not read yet), or raise why not."""
        return self._admit(int(self._expected_bytes), reading=True)

    def enter_read(self, nbytes: int) -> Ticket:
        """Admit a call whose message of ``nbytes`` is already read (a co-located
        datagram), or raise why not: :meth:`enter` and :meth:`add_bytes` in one step. Its
        size says nothing of the gRPC messages to come, so it leaves their expected size
        as it is."""
        return self._admit(nbytes, reading=False)

    def _admit(self, nbytes: int, *, reading: bool) -> Ticket:
        """Hold a call bringing ``nbytes`` (reserved while ``reading``), or raise."""
        if self._draining:
            raise DrainingError(
                "server is draining for shutdown; retry on another replica",
                retry_after_s=self.drain_retry_after_s,
                reason="DRAINING",
            )
        if self._calls >= self.max_calls:
            self._refuse(f"{self._calls} calls held (server.max_in_flight_calls)")
        if self._calls and self._bytes + nbytes > self.max_bytes:
            self._refuse(
                f"{self._bytes} request bytes held or expected "
                f"(server.max_in_flight_bytes {self.max_bytes})"
            )
        self._calls += 1
        self._readers += reading
        self._bytes += nbytes
        if self._idle is not None:
            self._idle.clear()
        ticket = Ticket(self, self._clock())
        ticket.nbytes = nbytes
        ticket.reading = reading
        return ticket

    def reading(self) -> int:
        """Calls admitted whose message is not read yet, reading or waiting for their
        turn (the batchers wait for them: :mod:`moe_router.chain.batcher`)."""
        return self._readers

    async def read_turn(self, ticket: Ticket) -> None:
        """Return once ``ticket``'s call may read its message: at most
        :data:`MAX_READERS` calls read at once, the others wait here in arrival order. A
        call cancelled while waiting gives its place up when its ticket is released."""
        if self._turns_taken < MAX_READERS and not self._turn_queue:
            self._turns_taken += 1
            ticket.turn = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket.turn = waiter
        self._turn_queue.append(ticket)
        await waiter  # the turn is ticket's when this returns (_end_turn hands it over)

    async def read_admitted(self, context: grpc.aio.ServicerContext, method: str
                            ) -> tuple[Ticket, Any]:
        """Admit a unary call run as a stream handler (Route, ModelInfer), hold it until
        its answer has been handed to gRPC, and read its single message in its turn: the
        ticket and the message, whose true size the door then gives :meth:`add_bytes`.

        Held until handed over, not only computed: a drain that waits for the held calls
        then never exits before an answer is out. Read with ``context.read()``, not by
        iterating the request stream: an ``async for`` left by ``return`` leaves grpc's
        receiving generator suspended on the message it yielded, which kept 8 MiB
        requests alive until a garbage collection (112 MiB held after 200 sequential
        calls, measured)."""
        ticket = self.enter()
        context.add_done_callback(lambda _: ticket.release())
        await self.read_turn(ticket)
        request = await context.read()
        if request is grpc.aio.EOF:
            raise ValidationError(f"{method}: the call carried no request message")
        return ticket, request

    def _end_turn(self, ticket: Ticket) -> None:
        """``ticket``'s call has read its message, or left: its turn goes to the next
        waiting call (its place in the queue, if it was still waiting, is skipped)."""
        turn, ticket.turn = ticket.turn, False
        if turn is True:
            self._turns_taken -= 1
            while self._turns_taken < MAX_READERS and self._turn_queue:
                waiting = self._turn_queue.popleft()
                waiter = waiting.turn
                if isinstance(waiter, asyncio.Future) and not waiter.done():
                    waiting.turn = True
                    self._turns_taken += 1
                    waiter.set_result(None)
        elif isinstance(turn, asyncio.Future):
            turn.cancel()  # skipped when its place comes

    def add_bytes(self, ticket: Ticket, nbytes: int) -> None:
        """The read message's true size replaces its reservation; raise when the held
        bytes then pass the bound and other calls are held (the ticket stays held, its
        bytes counted, until released)."""
        if ticket.reading:
            ticket.reading = False
            self._readers -= 1
            self._end_turn(ticket)
        self._bytes += nbytes - ticket.nbytes
        ticket.nbytes = nbytes
        # A maximum that halves every few seconds, not per message: measured, a
        # per-message decay let the small calls of a mixed load wash out the large ones
        # between two of them, and 40 large messages were read at once again.
        now = self._clock()
        halves = (now - self._expected_at) / _RESERVATION_HALF_LIFE_S
        decayed = self._expected_bytes * 0.5**halves
        self._expected_bytes = max(float(_MIN_RESERVATION), float(nbytes), decayed)
        self._expected_at = now
        if self._calls > 1 and self._bytes > self.max_bytes:
            self._refuse(
                f"{self._bytes} request bytes held with this call's {nbytes} "
                f"(server.max_in_flight_bytes {self.max_bytes})"
            )

    def _refuse(self, why: str) -> None:
        self._refused += 1
        raise OverloadedError(
            f"server overloaded: {why}; retry shortly or on another replica",
            retry_after_s=self.retry_after_s,
            reason="SERVER_OVERLOADED",
        )

    def _release(self, ticket: Ticket) -> None:
        if ticket.reading:
            self._readers -= 1
            self._end_turn(ticket)
        self._calls -= 1
        self._bytes -= ticket.nbytes
        held = self._clock() - ticket._started
        self._held_s += _EWMA_WEIGHT * (held - self._held_s)
        if self._calls == 0 and self._idle is not None:
            self._idle.set()

    @property
    def retry_after_s(self) -> float:
        """The delay a refused caller is told: the recent mean time a call was held."""
        return min(_MAX_RETRY_S, max(_MIN_RETRY_S, self._held_s))

    @property
    def drain_retry_after_s(self) -> float:
        """The delay a call refused by the drain is told: long enough that the client's
        next attempts come after this replica has exited (its held calls take about
        :attr:`retry_after_s` each). A round-robin client picks every replica in turn,
        the draining one included until its connection closes: with retries 10 ms apart,
        all five attempts of some calls landed on the draining replica (measured)."""
        return min(_MAX_RETRY_S, max(_MIN_DRAIN_RETRY_S, 2 * self._held_s))

    @property
    def draining(self) -> bool:
        """True once :meth:`close` was called."""
        return self._draining

    def close(self) -> None:
        """Refuse every new call from now on (UNAVAILABLE, reason DRAINING)."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is held, at most ``timeout`` s; True if none is."""
        if self._calls == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return self._calls == 0
        return True

    def stats(self) -> AdmissionFigures:
        """The figures now."""
        return AdmissionFigures(
            self._calls, self.max_calls, self._bytes, self.max_bytes, self._refused,
            self._draining,
        )
