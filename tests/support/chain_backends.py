"""Backends the chain and door tests wrap: a real TopKRouter run in a thread, and a faulty one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_router.chain.backend import RouteCall, RouteOptions, RouteResult
from moe_router.routing import RouterConfig, TopKRouter

HIDDEN = 16
EXPERTS = 8


def make_router(seed: int = 0, hidden: int = HIDDEN, experts: int = EXPERTS) -> TopKRouter:
    """A small Mixtral-style top-2 router with seeded gate weights."""
    torch.manual_seed(seed)
    router = TopKRouter(RouterConfig(hidden_size=hidden, num_experts=experts, top_k=2))
    return router.eval()


class TopKBackend:
    """The innermost stage for tests: a real router's forward in a worker thread."""

    def __init__(self, router: TopKRouter | None = None, name: str = "mixtral") -> None:
        self.router = router or make_router()
        self.name = name
        self.calls = 0
        self.version = self.router.version()
        self.gate: asyncio.Event | None = None  # when set, calls wait for it first

    async def route(self, call: RouteCall) -> RouteResult:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        started = time.perf_counter()
        extra = dict(call.options.extra_inputs)

        def forward() -> Any:
            with torch.no_grad():
                return self.router(call.hidden_states, return_losses=call.options.return_losses,
                                   **extra)

        output = await asyncio.to_thread(forward)
        elapsed_us = int((time.perf_counter() - started) * 1e6)
        return RouteResult(
            output=output,
            router_version=self.version,
            batch_tokens=call.num_tokens,
            compute_time_us=max(elapsed_us, 1),
            queue_time_us=3,
        )

    def stats(self) -> int:
        """Calls that reached this stage."""
        return self.calls


class FaultyBackend:
    """A backend that raises what ``fault`` returns (None: answer like the real router)."""

    def __init__(self, fault: Callable[[RouteCall], BaseException | None] | None = None,
                 clock: Any = None, duration_s: float = 0.0) -> None:
        self.real = TopKBackend()
        self.fault = fault
        self.clock = clock
        self.duration_s = duration_s
        self.calls = 0

    async def route(self, call: RouteCall) -> RouteResult:
        self.calls += 1
        if self.clock is not None and self.duration_s:
            self.clock.advance(self.duration_s)
        exc = self.fault(call) if self.fault else None
        if exc is not None:
            raise exc
        return await self.real.route(call)

    def stats(self) -> int:
        """Calls that reached this stage."""
        return self.calls


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_call(hidden_states: torch.Tensor | None = None, *, router: str = "mixtral",
              layer: int = 0, seed_tensor: int = 0, peer: str = "",
              deadline: float | None = None, **options: Any) -> RouteCall:
    """A RouteCall over seeded hidden states [4, HIDDEN] unless given."""
    if hidden_states is None:
        gen = torch.Generator().manual_seed(seed_tensor)
        hidden_states = torch.randn(4, HIDDEN, generator=gen)
    return RouteCall(router=router, layer=layer, hidden_states=hidden_states,
                     options=RouteOptions(**options), peer=peer, deadline=deadline)
