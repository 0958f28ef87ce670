"""Concurrent callers of one door against a real server, every outcome recorded (drain
tests): the gRPC door's :class:`route_load.RouteLoad` for the Open Inference Protocol
door (tritonclient's asyncio client) and the co-located door (AsyncCoLocatedClient)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from route_load import Outcome, RecordedLoad
from tritonclient.utils import InferenceServerException

from moe_router_client import AsyncCoLocatedClient
from moe_router_client.errors import RouterError

DOORS = ("oip", "colocated")


def _code(exc: Exception) -> tuple[str, str]:
    """(status code name, details) of a failed call, from either door's client."""
    if isinstance(exc, RouterError):
        return exc.code.name, exc.details[:200]
    if isinstance(exc, InferenceServerException):  # status() reads "StatusCode.UNAVAILABLE"
        return str(exc.status()).rpartition(".")[2], str(exc.message())[:200]
    raise exc


@dataclass
class DoorLoad(RecordedLoad):
    """``callers`` coroutines routing ``inputs`` (router, hidden states) round-robin
    through ``door`` (one of :data:`DOORS`) until :meth:`stop`."""

    door: str
    target: str
    inputs: Sequence[tuple[str, np.ndarray]]
    callers: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _stopping: bool = False

    async def run(self) -> None:
        """Route until :meth:`stop`; returns when every caller has finished its call."""
        await asyncio.gather(*(self._caller(i) for i in range(self.callers)))

    async def _caller(self, index: int) -> None:
        if self.door == "oip":
            client: Any = triton_aio.InferenceServerClient(self.target)
        else:
            client = await AsyncCoLocatedClient.connect(self.target, fallback=False, timeout=60)
        try:
            await self._route_in_turns(
                index, lambda router, x: self._call(client, router, x), _code, True)
        finally:
            await client.close()

    async def _call(self, client: Any, router: str, x: np.ndarray) -> None:
        if self.door == "oip":
            tensor = triton.InferInput("hidden_states", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            answer = await client.infer(router, [tensor], client_timeout=60)
            assert answer.as_numpy("expert_indices").shape[0] == x.shape[0]
        else:
            answer = await client.route(router, x, skip_cache=True)
            assert answer.expert_indices.shape[0] == x.shape[0]
