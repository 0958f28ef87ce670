"""Concurrent Route callers against real servers, every outcome recorded (drain tests).

``RouteLoad`` runs ``callers`` coroutines on one ``AsyncRouterClient``; each routes in a
loop until :meth:`RouteLoad.stop` and records (start time, end time, status code name)
per call, so a test can ask what happened to the calls in flight at a given moment.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moe_router_client import AsyncRouterClient
from moe_router_client.errors import RouterError


@dataclass(frozen=True)
class Outcome:
    """One call: when it started and ended (``time.monotonic``) and how (``OK`` or a code)."""

    started: float
    ended: float
    code: str
    details: str = ""


class RecordedLoad:
    """What every load keeps: its ``inputs`` (router, hidden states), ``outcomes`` (one
    per call) and a ``_stopping`` flag."""

    inputs: Sequence[tuple[str, np.ndarray]]
    outcomes: list[Outcome]
    _stopping: bool

    async def run(self) -> None:
        """Route until :meth:`stop`; returns when every caller has finished its call."""
        raise NotImplementedError

    async def _route_in_turns(
        self, index: int, call: Callable[[str, np.ndarray], Awaitable[None]],
        code_of: Callable[[Exception], tuple[str, str]], pause_when_unavailable: bool,
    ) -> None:
        """One caller: ``call`` each input in turn until stopped, recording each outcome
        (``code_of`` names a failure, or raises what is no call's failure)."""
        turn = index
        while not self._stopping:
            router, x = self.inputs[turn % len(self.inputs)]
            turn += 1
            started = time.monotonic()
            try:
                await call(router, x)
                self.outcomes.append(Outcome(started, time.monotonic(), "OK"))
            except Exception as exc:
                code, details = code_of(exc)
                self.outcomes.append(Outcome(started, time.monotonic(), code, details))
                if code == "UNAVAILABLE" and pause_when_unavailable:
                    await asyncio.sleep(0.05)  # a lone server is going away: do not spin

    def stop(self) -> None:
        """Let every caller finish its current call and return."""
        self._stopping = True

    def counts(self) -> collections.Counter[str]:
        """Outcomes by code."""
        return collections.Counter(o.code for o in self.outcomes)

    def in_flight_at(self, moment: float) -> list[Outcome]:
        """The calls started before ``moment`` that ended after it."""
        return [o for o in self.outcomes if o.started < moment < o.ended]


@dataclass
class RouteLoad(RecordedLoad):
    """Callers routing ``inputs`` (router name, hidden states) round-robin until stopped."""

    target: str
    inputs: Sequence[tuple[str, np.ndarray]]
    callers: int = 16
    retries: int = 0
    load_balancing: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    _stopping: bool = False

    async def run(self) -> None:
        """Route until :meth:`stop`; returns when every caller has finished its call."""
        async with AsyncRouterClient(
            self.target, timeout=60, retries=self.retries,
            load_balancing=self.load_balancing,  # type: ignore[arg-type]
        ) as client:
            await asyncio.gather(*(self._caller(client, i) for i in range(self.callers)))

    async def _caller(self, client: AsyncRouterClient, index: int) -> None:
        async def call(router: str, x: np.ndarray) -> None:
            await client.route(router, x, skip_cache=True)

        await self._route_in_turns(index, call, _route_code, self.retries == 0)


def _route_code(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, RouterError):
        return exc.code.name, exc.details[:200]
    raise exc
