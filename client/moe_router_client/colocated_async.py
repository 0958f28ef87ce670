"""AsyncCoLocatedClient: :class:`~moe_router_client.colocated.CoLocatedClient` for asyncio,
the same exchanges (:mod:`moe_router_client.colocated_session`) on the running loop.

    async with await AsyncCoLocatedClient.connect("127.0.0.1:50051") as client:
        result = await client.route("mixtral", hidden_states, layer=3)
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import numpy as np

from moe_router_client import colocated_wire as wire
from moe_router_client.channel import DEFAULT_TARGET
from moe_router_client.client import AsyncRouterClient
from moe_router_client.colocated import (
    _RECEIVE_BYTES,
    _answer,
    _Deadline,
    _deadline_error,
    _route_arguments,
    _transport_error,
    local_socket_path,
)
from moe_router_client.colocated_session import MemfdRegion, Session, Step
from moe_router_client.colocated_shared import (
    SharedBuffers,
    nbytes_of,
    plain_array,
    shared_array,
)
from moe_router_client.errors import UnavailableError
from moe_router_client.results import RouteResult

__all__ = ["AsyncCoLocatedClient"]


class _AsyncConnection:
    """A non-blocking socket on the running loop and its session."""

    def __init__(self, sock: socket.socket, session: Session, path: Path) -> None:
        self.sock = sock
        self.session = session
        self.path = path
        self.broken = False  # a message went out and its answer did not come back
        self._buffer = bytearray(_RECEIVE_BYTES)

    @classmethod
    async def open(cls, path: Path, session: Session, timeout: float | None) -> _AsyncConnection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        connection = cls(sock, session, path)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
            await connection.run(session.hello(), _Deadline(timeout))
        except BaseException:
            connection.close()
            raise
        return connection

    async def _send(self, data: bytes | bytearray, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        if not fds:
            await loop.sock_sendall(self.sock, data)
            return
        while True:  # sendmsg has no asyncio form: try, and wait for room when full
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock.fileno())

    async def _exchange(self, step: Step) -> Any:
        loop = asyncio.get_running_loop()
        try:
            data, fds = next(step)
            while True:
                self.broken = True
                await self._send(data, fds)
                sent = int.from_bytes(data[1:9], "little")
                answer = None
                while answer is None:
                    nbytes = await loop.sock_recv_into(self.sock, self._buffer)
                    if nbytes == 0:
                        raise ConnectionResetError("the server closed the connection")
                    answer = _answer(memoryview(self._buffer)[:nbytes], sent)
                self.broken = False
                data, fds = step.send(answer)
        except StopIteration as done:
            return done.value

    async def run(self, step: Step, deadline: _Deadline) -> Any:
        try:
            return await asyncio.wait_for(self._exchange(step), deadline.left())
        except asyncio.TimeoutError as exc:
            raise _deadline_error() from exc
        except OSError as exc:
            raise _transport_error(str(exc) or type(exc).__name__, self.path) from exc

    def close(self) -> None:
        self.sock.close()
        self.session.close()


class AsyncCoLocatedClient:
    """asyncio client of the co-located door: :class:`CoLocatedClient`'s arguments and
    ``route``, as a coroutine (falling back to AsyncRouterClient). Create it with
    ``await AsyncCoLocatedClient.connect(...)`` (it probes the door) and ``await close()``
    or use ``async with``."""

    def __init__(self, target: str, path: Path | None, options: dict[str, Any],
                 grpc_client: AsyncRouterClient | None) -> None:
        self._target = target
        self._path = path
        self._api_key = options.get("api_key")
        self._timeout = options.get("timeout")
        self._inline_limit = options.get("inline_limit", 0)
        self._descriptions: dict[str, wire.Description] = {}
        self._idle: list[_AsyncConnection] = []
        self._slots = asyncio.Semaphore(options.get("max_connections", 8))
        self._shared = SharedBuffers()
        self._keeper: _AsyncConnection | None = None  # registers the shared buffers only
        self._keeper_lock = asyncio.Lock()
        self._grpc = grpc_client

    @classmethod
    async def connect(
        cls,
        target: str = DEFAULT_TARGET,
        *,
        socket_path: str | Path | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        max_connections: int = 8,
        fallback: bool = True,
        inline_limit: int = 0,
        **grpc_options: Any,
    ) -> AsyncCoLocatedClient:
        """A client on the door when it answers, else on gRPC (unless ``fallback=False``)."""
        path = Path(socket_path) if socket_path is not None else local_socket_path(target)
        options = {"api_key": api_key, "timeout": timeout, "max_connections": max_connections,
                   "inline_limit": inline_limit}
        client = cls(target, path, options, None)
        if path is not None:
            try:
                client._idle.append(await client._connect())
                return client
            except UnavailableError:
                pass
        if not fallback:
            raise _transport_error("nothing listens there", path or Path("-"))
        client._grpc = AsyncRouterClient(target, api_key=api_key, timeout=timeout,
                                         **grpc_options)
        return client

    async def _connect(self) -> _AsyncConnection:
        assert self._path is not None
        session = Session(self._api_key, self._descriptions, inline_limit=self._inline_limit)
        try:
            return await _AsyncConnection.open(self._path, session, self._timeout or 10.0)
        except OSError as exc:
            raise _transport_error(exc.strerror or str(exc), self._path) from exc

    @property
    def transport(self) -> str:
        """``"colocated"`` or ``"grpc"`` (the fallback)."""
        return "grpc" if self._grpc is not None else "colocated"

    async def route(
        self,
        router: str,
        hidden_states: Any,
        layer: int = 0,
        *,
        return_router_logits: bool = False,
        return_losses: bool = False,
        skip_cache: bool = False,
        seed: int | None = None,
        attention_weights: Any = None,
        logits: Any = None,
        gradients: Any = None,
        request_id: str | None = None,
        input_ids: Any = None,
        timeout: float | None = None,
        as_torch: bool = False,
    ) -> RouteResult:
        """Route one batch of tokens for one MoE layer (RouterClient.route's arguments;
        ``input_ids`` and ``return_losses`` as for :meth:`CoLocatedClient.route`)."""
        arguments = dict(locals())
        del arguments["self"]
        if self._grpc is not None:
            return await self._grpc.route(**arguments)
        deadline = _Deadline(timeout if timeout is not None else self._timeout)
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                return await connection.run(connection.session.route(
                    router, hidden_states, layer, timeout_s=deadline.left,
                    shared=self._shared, **_route_arguments(arguments),
                ), deadline)
            finally:
                if connection.broken:  # the server may still read its region: never reuse
                    connection.close()
                else:
                    self._idle.append(connection)

    async def shared_buffer(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        """:meth:`CoLocatedClient.shared_buffer`, as a coroutine."""
        shape = tuple(int(d) for d in shape)
        if self._grpc is not None:
            return plain_array(shape, dtype)
        region = MemfdRegion(self._shared.new_name(), max(1, nbytes_of(shape, dtype)))
        async with self._keeper_lock:
            if self._keeper is None:
                self._keeper = await self._connect()
            await self._keeper.run(self._keeper.session.register(region),
                                   _Deadline(self._timeout or 10.0))
        self._shared.add(region)
        return shared_array(region.mapping, shape, dtype)

    async def close(self) -> None:
        """Close every connection, or the fallback channel."""
        if self._grpc is not None:
            await self._grpc.close()
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.close()
        self._shared.close()

    async def __aenter__(self) -> AsyncCoLocatedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

