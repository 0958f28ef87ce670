"""One load-generating client process of ``moe-router bench``, and its client kinds.

A worker is a separate interpreter (so clients never share the measured server's, or
each other's, GIL) running closed-loop callers: ``concurrency`` coroutines, each sending
its next call as soon as the last one answered. It builds its own request (seeded random
hidden states, never shipped over the pipe), warms up until a start instant the parent
chose, times calls until an end instant, and reports every call's (start, end) on the
shared monotonic clock. The parent side is :mod:`moe_router.analysis.load_client`.

Parent and worker talk in JSON lines over the worker's stdin/stdout: ``prepare`` (a
:class:`LoadSpec`) -> ``{"request_bytes"}`` (``{"unavailable"}`` when the transport
cannot be driven here, ``{"error"}`` when the caller could not be built), then ``go`` ->
the calls. A worker exits when its stdin closes, so a vanished parent leaves nothing
behind.
This file runs as ``__main__`` through ``runpy`` and imports nothing of ``moe_router``
(whose package import would load torch): only grpcio, numpy and ``moe_router_client``.

**Client kinds.** How a call travels is the spec's ``transport`` (:class:`Transport`);
each kind is a :class:`Caller`, built by :func:`make_caller` once per prepared spec:

- ``grpc``: the raw ``grpc.aio`` stub of ``moe_router.v1.RouterService/Route`` (or of the
  echo server's method), request serialized once, one channel per target kept for the
  whole run;
- ``colocated``: :class:`ColocatedCaller`, the adapter for the shared-memory door. A
  worker's lone caller uses ``LoadSpec.blocking_client_class`` when one is named (a
  serving stack's forward thread waits for its answer: the blocking client, which polls
  for a small call's answer), several callers the asyncio client.

**The co-located adapter's interface.** :class:`ColocatedCaller` drives the class that
``LoadSpec.client_class`` names (``module:Name``, default
:data:`COLOCATED_CLIENT_CLASS`). That class must offer what
:class:`moe_router_client.AsyncRouterClient` offers, which is also what the gRPC
fallback of a co-located client naturally keeps:

- ``await Client.connect(target, fallback=False)`` (or, for a class without ``connect``,
  ``Client(target)``): ``target`` is the service's gRPC ``host:port``; the client finds the
  local door from it, registering its regions as it needs, and never falls back to gRPC
  (the bench must measure the door it names);
- ``await client.route(router, hidden_states, layer=0, skip_cache=True)`` -> a result with
  numpy ``expert_indices``, ``expert_weights`` and ``num_experts_per_token``; failures
  raise ``moe_router_client.RouterError``;
- ``await client.close()``;
- optionally ``await client.shared_buffer(shape, dtype)`` (blocking: without ``await``):
  an array in shared memory the server reads in place; the adapter writes its hidden
  states there once and routes that, as a serving stack that registers its activations
  does (the issue's door: the caller writes into a region it registered once).

``hidden_states`` is a numpy ``[tokens, dim]`` array, float32 or ``ml_dtypes.bfloat16``,
made once per cell (a real caller reuses its buffers too). Where the door's client has
another shape, change :class:`ColocatedCaller` alone (about 30 lines); where the server
needs a config section to open the door, add it in
:func:`moe_router.analysis.bench_plan.service_config`. Until the class exists,
:func:`transport_unavailable` says so in one line and the bench skips the column.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Protocol

__all__ = ["COLOCATED_BLOCKING_CLIENT_CLASS", "COLOCATED_CLIENT_CLASS", "Caller", "CallFailed",
           "ColocatedCaller", "LoadSpec", "Method", "ROUTE_METHOD", "Transport", "make_caller",
           "transport_unavailable"]

ROUTE_METHOD = "/moe_router.v1.RouterService/Route"
COLOCATED_CLIENT_CLASS = "moe_router_client:AsyncCoLocatedClient"
"""The co-located door's asyncio client, as ``module:Name`` (the name is the lead's to fix)."""
COLOCATED_BLOCKING_CLIENT_CLASS = "moe_router_client:CoLocatedClient"
"""The co-located door's blocking client: ``Client(target, fallback=False)``, a blocking
``route`` with the asyncio one's arguments, ``close()``."""
_CALL_TIMEOUT_S = 300.0
_MAX_CONSECUTIVE_ERRORS = 20
_MIN_TIMED_CALLS = 3  # per caller, past the end instant if need be (100 MB requests)
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

Method = Literal["route", "echo"]


class Transport(str, Enum):
    """How a Route call travels: a client kind of the bench."""

    GRPC = "grpc"
    """moe_router.v1 over loopback gRPC (and the echo floor's gRPC)."""
    COLOCATED = "colocated"
    """The shared-memory door for callers on the same host."""


@dataclass(frozen=True)
class LoadSpec:
    """What every call of a load run sends.

    method: ``route`` calls the service's Route; ``echo`` sends the same serialized
    RouteRequest to the echo server, asking for ``response_bytes`` back (gRPC only).
    transport: the client kind (:class:`Transport` value). The request holds
    ``tokens x dim`` seeded standard-normal hidden states in ``dtype`` (float32 or
    bfloat16), with ``skip_cache`` set; ``payload_bytes`` > 0 sends that many raw bytes
    instead (echo only, for the large-message test). client_class: the co-located
    client, ``module:Name`` (colocated only); blocking_client_class: the blocking one a
    worker's lone caller uses ("" for the asyncio one always).
    """

    target: str
    method: Method
    router: str = ""
    tokens: int = 1
    dim: int = 1
    dtype: str = "float32"
    response_bytes: int = 0
    payload_bytes: int = 0
    seed: int = 0
    transport: str = Transport.GRPC.value
    client_class: str = COLOCATED_CLIENT_CLASS
    blocking_client_class: str = ""


class CallFailed(Exception):
    """One call failed; the message is ``CODE: details`` for the report."""


class Caller(Protocol):
    """One client kind, ready to repeat the prepared call."""

    request_bytes: int
    """Bytes of one request as the kind sends it (the hidden states for a door without a
    message around them)."""

    async def call(self) -> int:
        """Make one call; the size of its answer in bytes. Raises :class:`CallFailed`."""

    async def close(self) -> None:
        """Let go of what :func:`make_caller` opened for this spec (not shared channels)."""

    def drive(self, callers: int) -> None:
        """Told before each run how many of this worker's callers share the caller."""


def _import_class(path: str) -> Any:
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


def transport_unavailable(transport: str, client_class: str = COLOCATED_CLIENT_CLASS
                          ) -> str | None:
    """Why this process cannot drive ``transport`` (one line), or None when it can."""
    if transport == Transport.GRPC.value:
        return None
    if transport != Transport.COLOCATED.value:
        return f"unknown transport {transport!r}; expected one of " + \
            ", ".join(t.value for t in Transport)
    module_name, _, name = client_class.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"cannot import {module_name} ({exc})"
    if not name or not hasattr(module, name):
        return (f"{module_name} has no {name or '(no name)'} (the shared-memory client is "
                f"not built on this branch)")
    return None


def _hidden_states(spec: LoadSpec) -> Any:
    """Seeded ``[tokens, dim]`` hidden states: float32, or the bfloat16 of the same values
    as its uint16 bit pattern (the upper half of each float32)."""
    import numpy as np

    hidden = np.random.default_rng(spec.seed).standard_normal((spec.tokens, spec.dim),
                                                              dtype=np.float32)
    if spec.dtype == "bfloat16":
        return (hidden.view(np.uint32) >> 16).astype(np.uint16)
    return hidden


class _GrpcCaller:
    """The raw stub: the request serialized once by grpc, no client-side decoding."""

    def __init__(self, spec: LoadSpec, channel: Any, echo_method: str, echo_key: str) -> None:
        import grpc
        import numpy as np

        from moe_router_client.tensors import to_wire
        from moe_router_client.v1 import router_pb2 as pb

        self._errors = grpc.aio.AioRpcError
        serializer = pb.RouteRequest.SerializeToString
        if spec.payload_bytes > 0:
            self._request: Any = bytes(spec.payload_bytes)
            serializer = None
            self.request_bytes = spec.payload_bytes
        else:
            hidden = _hidden_states(spec)
            self._request = request = pb.RouteRequest(router=spec.router, layer=0,
                                                      skip_cache=True)
            to_wire(hidden, dtype=pb.BFLOAT16 if hidden.dtype == np.uint16 else None,
                    out=request.hidden_states)
            self.request_bytes = request.ByteSize()
        if spec.method == "route":
            self._stub = channel.unary_unary(ROUTE_METHOD, request_serializer=serializer,
                                             response_deserializer=pb.RouteResponse.FromString)
            self._metadata: tuple[tuple[str, str], ...] = ()
        else:
            self._stub = channel.unary_unary(echo_method, request_serializer=serializer)
            self._metadata = ((echo_key, str(spec.response_bytes)),)

    async def call(self) -> int:
        try:
            response = await self._stub(self._request, timeout=_CALL_TIMEOUT_S,
                                        metadata=self._metadata)
        except self._errors as exc:
            raise CallFailed(f"{exc.code().name}: {exc.details()}") from None
        return len(response) if isinstance(response, bytes) else int(response.ByteSize())

    async def close(self) -> None:
        return None  # the channel belongs to the worker

    def drive(self, callers: int) -> None:
        return None  # a channel carries any number of callers


class ColocatedCaller:
    """The adapter for the shared-memory door (its interface: the module docstring)."""

    def __init__(self, spec: LoadSpec) -> None:
        from moe_router_client import RouterError

        hidden = _hidden_states(spec)
        if spec.dtype == "bfloat16":
            import ml_dtypes  # the client's numpy form of bf16

            hidden = hidden.view(ml_dtypes.bfloat16)
        self._hidden, self._router, self._errors = hidden, spec.router, RouterError
        self._class, self._target = _import_class(spec.client_class), spec.target
        self._blocking_class = (_import_class(spec.blocking_client_class)
                                if spec.blocking_client_class else None)
        self._client: Any = None
        self._blocking: Any = None
        self._inputs: dict[str, Any] = {}  # each client's copy of the hidden states
        self._lone = False
        self.request_bytes = int(hidden.nbytes)

    def drive(self, callers: int) -> None:
        self._lone = callers == 1 and self._blocking_class is not None

    async def call(self) -> int:
        try:
            if self._lone:  # blocks the worker's loop, which drives this caller alone
                if self._blocking is None:
                    self._blocking = self._blocking_class(self._target, fallback=False)  # type: ignore[misc]
                    make = getattr(self._blocking, "shared_buffer", None)
                    self._inputs["blocking"] = self._shared(
                        None if make is None else make(self._hidden.shape, self._hidden.dtype))
                result = self._blocking.route(self._router, self._inputs["blocking"], layer=0,
                                              skip_cache=True)
            else:
                if self._client is None:  # connected on the first call, on the worker's loop
                    connect = getattr(self._class, "connect", None)
                    self._client = (await connect(self._target, fallback=False)
                                    if connect is not None else self._class(self._target))
                    make = getattr(self._client, "shared_buffer", None)
                    self._inputs["asyncio"] = self._shared(
                        None if make is None else await make(self._hidden.shape,
                                                             self._hidden.dtype))
                result = await self._client.route(self._router, self._inputs["asyncio"],
                                                  layer=0, skip_cache=True)
        except self._errors as exc:
            raise CallFailed(f"{exc.code.name}: {exc.details}") from None
        return int(result.expert_indices.nbytes + result.expert_weights.nbytes
                   + result.num_experts_per_token.nbytes)

    def _shared(self, buffer: Any) -> Any:
        """The hidden states written once into ``buffer`` (shared memory the server reads
        in place, as a serving stack that registers its activations uses the door), or
        the plain array for a client without shared buffers (``buffer`` None)."""
        if buffer is None:
            return self._hidden
        buffer[...] = self._hidden
        return buffer

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._blocking is not None:
            self._blocking.close()


def make_caller(spec: LoadSpec, channel: Any, echo_method: str, echo_key: str) -> Caller:
    """The :class:`Caller` of ``spec.transport``; ``channel`` serves the gRPC kind."""
    if spec.transport == Transport.COLOCATED.value:
        if spec.method != "route":
            raise ValueError("the co-located transport carries Route calls only")
        return ColocatedCaller(spec)
    return _GrpcCaller(spec, channel, echo_method, echo_key)


class _Worker:
    """One worker process: a channel per gRPC target, the callers of the cell in hand (the
    bench's rounds rotate over a cell's doors, so each keeps its built request), the drive
    loop."""

    _KEPT_CALLERS = 4

    def __init__(self) -> None:
        self._channels: dict[str, Any] = {}
        self._callers: dict[LoadSpec, Caller] = {}
        self._caller: Caller | None = None

    def _channel(self, target: str) -> Any:
        import grpc

        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(
                target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        return channel

    async def prepare(self, spec: LoadSpec, echo_method: str, echo_key: str
                      ) -> dict[str, Any]:
        self._caller = self._callers.pop(spec, None)
        if self._caller is None:
            while len(self._callers) >= self._KEPT_CALLERS:  # let old requests go first
                await self._callers.pop(next(iter(self._callers))).close()
            reason = transport_unavailable(spec.transport, spec.client_class) or (
                spec.blocking_client_class and transport_unavailable(
                    spec.transport, spec.blocking_client_class)) or None
            if reason is not None:
                return {"unavailable": reason}
            channel = self._channel(spec.target) if spec.transport == Transport.GRPC.value \
                else None
            try:
                self._caller = make_caller(spec, channel, echo_method, echo_key)
            except Exception as exc:  # reported to the parent, which names the cell
                return {"error": f"{type(exc).__name__}: {exc}"}
        self._callers[spec] = self._caller  # now the most recently used
        return {"request_bytes": self._caller.request_bytes}

    async def go(self, concurrency: int, warmup_until: float, measure_until: float
                 ) -> dict[str, Any]:
        caller = self._caller
        if caller is None:
            raise RuntimeError("go before a successful prepare")
        caller.drive(concurrency)
        starts: list[float] = []
        ends: list[float] = []
        errors: list[str] = []
        response_bytes = [0]

        async def one_call() -> float | None:
            start = time.monotonic()
            try:
                size = await caller.call()
            except CallFailed as exc:
                errors.append(str(exc))
                return None
            response_bytes[0] = response_bytes[0] or size
            return start

        async def one_caller() -> None:
            failures = 0
            while failures < _MAX_CONSECUTIVE_ERRORS:  # warm up, at least one call
                failures = 0 if await one_call() is not None else failures + 1
                if time.monotonic() >= warmup_until:
                    break
            timed = 0
            while failures < _MAX_CONSECUTIVE_ERRORS and (timed < _MIN_TIMED_CALLS
                                                          or time.monotonic() < measure_until):
                start = await one_call()
                if start is None:
                    failures += 1
                    continue
                failures = 0
                starts.append(start)
                ends.append(time.monotonic())
                timed += 1

        await asyncio.gather(*(one_caller() for _ in range(concurrency)))
        return {"starts": starts, "ends": ends, "errors": len(errors),
                "first_error": errors[0] if errors else "", "response_bytes": response_bytes[0]}

    async def close(self) -> None:
        for caller in self._callers.values():
            await caller.close()
        for channel in self._channels.values():
            await channel.close()


async def _worker_main() -> None:
    worker = _Worker()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            message = json.loads(line)
            if message["op"] == "prepare":
                reply = await worker.prepare(LoadSpec(**message["spec"]),
                                             message["echo_method"], message["echo_key"])
            else:
                reply = await worker.go(message["concurrency"], message["warmup_until"],
                                        message["measure_until"])
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await worker.close()


if __name__ == "__main__":
    try:
        asyncio.run(_worker_main())
    except KeyboardInterrupt:
        pass
    os._exit(0)  # skip grpc's atexit teardown: the parent only waits for the exit
