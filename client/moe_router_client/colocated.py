"""CoLocatedClient: Route through the server's co-located door, for a serving stack on
the same host, falling back to gRPC (AsyncCoLocatedClient, its asyncio form, is in
:mod:`moe_router_client.colocated_async`).

    from moe_router_client import CoLocatedClient

    with CoLocatedClient("127.0.0.1:50051") as client:        # the server's gRPC target
        result = client.route("mixtral", hidden_states, layer=3)  # as RouterClient.route
        client.transport                                        # "colocated" or "grpc"

``route`` takes RouterClient.route's arguments (``input_ids`` for hash routers,
``return_losses`` for the aux and z losses) and returns the same
:class:`~moe_router_client.results.RouteResult` with the same bits; errors are the same
:class:`~moe_router_client.errors.RouterError` classes. The door is found at
``socket_path`` or, for a loopback target (``127.0.0.1``, ``localhost``, ``::1``), at
the server's default path for that port; when the target is not local or nothing
listens there, calls go over gRPC (``RouterClient``) unless ``fallback=False``.

Each connection (up to ``max_connections``, opened as concurrent calls need them, one
call at a time each) owns an input and an output region that every call and layer
reuses; see :mod:`moe_router_client.colocated_session`. A connection whose call timed
out or failed in transport is closed, never reused (the server may still be reading its
region). ``shared_buffer`` makes arrays the server reads in place, with no copy
(:mod:`moe_router_client.colocated_shared`). Torch is imported only for torch tensors.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from moe_router_client import colocated_wire as wire
from moe_router_client.channel import DEFAULT_TARGET
from moe_router_client.client import RouterClient
from moe_router_client.colocated_session import MemfdRegion, Session, Step
from moe_router_client.colocated_shared import (
    SharedBuffers,
    nbytes_of,
    plain_array,
    shared_array,
)
from moe_router_client.errors import (
    DeadlineExceededError,
    InternalError,
    UnavailableError,
)
from moe_router_client.results import RouteResult

__all__ = ["CoLocatedClient", "local_socket_path"]

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_EXTRA_INPUTS = ("attention_weights", "logits", "gradients")
_RECEIVE_BYTES = 1 << 18  # an answer: a few scalars and tokens_per_expert
DEFAULT_SPIN_US = 1000
"""How long a lone call polls for its answer before it sleeps (``spin_us``), when calls
of its size came back within that time. A caller that sleeps in ``recv`` pays for being
woken up (the halted core, the interrupt, the reschedule, cold caches): one blocking
caller measured 266 -> 140 us p50 for 1-token Mixtral calls, 400 -> 305 us for 1-token
DeepSeek-V3 (2 shared cores). 1000 rather than 500: on a host where a 1-token
DeepSeek-V3 call takes a little over 500 us it slept every time (597-616 -> 535-549 us
p50). Calls that take longer never poll: 2048-token calls that polled first came back
8-25% later (the poll took a core from the server's pass)."""


def local_socket_path(target: str) -> Path | None:
    """The default door of a loopback ``host:port`` target, None for any other target."""
    host, sep, port = target.removeprefix("dns:///").rpartition(":")
    if not sep or not port.isdigit() or host not in _LOOPBACK:
        return None
    return wire.default_socket_path(int(port), os.geteuid())


class _Deadline:
    """Seconds left of one call (None: no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


def _transport_error(what: str, path: Path) -> UnavailableError:
    return UnavailableError(grpc.StatusCode.UNAVAILABLE,
                            f"co-located door {path}: {what}; retry (the server may be "
                            "restarting) or use gRPC")


def _deadline_error() -> DeadlineExceededError:
    return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "the call did not finish before its deadline")


def _answer(data: memoryview, sent: int) -> wire.Message | None:
    """The answer in ``data`` to the message numbered ``sent``; None for a late answer
    to an earlier one (abandoned by an interrupt), which the caller reads past."""
    answer = wire.decode(data)
    if answer.seq == sent:
        return answer
    if answer.seq < sent:
        return None
    raise InternalError(grpc.StatusCode.INTERNAL,
                        f"co-located server answered message {answer.seq}, expected {sent}")


def _size_class(hidden_states: Any) -> int:
    """Calls whose inputs are within a factor of two in bytes take about as long (numpy
    arrays and torch tensors both have ``nbytes``)."""
    return int(hidden_states.nbytes).bit_length()


def _route_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """RouterClient.route's keyword arguments, as Session.route takes them."""
    return {
        "extra_inputs": {n: kwargs[n] for n in _EXTRA_INPUTS if kwargs.get(n) is not None},
        "input_ids": kwargs["input_ids"],
        "return_router_logits": kwargs["return_router_logits"],
        "return_losses": kwargs["return_losses"],
        "skip_cache": kwargs["skip_cache"],
        "seed": kwargs["seed"],
        "request_id": kwargs["request_id"],
        "as_torch": kwargs["as_torch"],
    }


class _Connection:
    """A blocking socket and the session whose exchanges it carries."""

    def __init__(self, path: Path, session: Session, connect_timeout: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.session = session
        self.path = path
        self.broken = False  # a message went out and its answer did not come back
        self._buffer = bytearray(_RECEIVE_BYTES)
        try:
            self.sock.settimeout(connect_timeout)
            self.sock.connect(str(path))
            self.run(session.hello(), _Deadline(connect_timeout))
        except BaseException:
            self.close()
            raise

    def run(self, step: Step, deadline: _Deadline, spin_s: float = 0.0) -> Any:
        """Drive ``step`` to its end: send what it yields, feed it each answer, polling
        for each up to ``spin_s`` before sleeping (:data:`DEFAULT_SPIN_US`). A failure
        between a send and its answer marks the connection broken."""
        try:
            data, fds = next(step)
            while True:
                left = deadline.left()
                if left == 0.0:
                    raise TimeoutError
                self.sock.settimeout(left)
                self.broken = True
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
                sent = int.from_bytes(data[1:9], "little")
                answer = None
                while answer is None:
                    # never past the deadline: the blocking read below keeps to it
                    nbytes = self._poll(spin_s if left is None else min(spin_s, left))
                    if nbytes is None:
                        nbytes = self.sock.recv_into(self._buffer)
                    if nbytes == 0:
                        raise ConnectionResetError("the server closed the connection")
                    answer = _answer(memoryview(self._buffer)[:nbytes], sent)
                self.broken = False
                data, fds = step.send(answer)
        except StopIteration as done:
            return done.value
        except TimeoutError as exc:
            raise _deadline_error() from exc
        except OSError as exc:
            raise _transport_error(str(exc) or type(exc).__name__, self.path) from exc

    def _poll(self, spin_s: float) -> int | None:
        """The size of a datagram that arrives within ``spin_s`` (read into the buffer),
        or None. Between polls the thread yields its core, to the server if it shares
        it."""
        if spin_s <= 0.0:
            return None
        stop = time.perf_counter() + spin_s
        while True:
            try:
                return self.sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if time.perf_counter() >= stop:
                    return None
                os.sched_yield()

    def close(self) -> None:
        self.sock.close()
        self.session.close()


class CoLocatedClient:
    """Blocking client of a moe-router server's co-located door (thread-safe).

    ``target``: the server's gRPC ``host:port`` (the fallback, and how a loopback
    target's default socket path is found). ``socket_path``: the door's socket when not
    the default. ``api_key``: as for RouterClient (sent once per connection). ``timeout``:
    default deadline per call in seconds. ``max_connections``: concurrent calls at most
    (each has its own connection and regions). ``fallback``: use gRPC when the door is not
    there (else raise UnavailableError). ``inline_limit``: inputs of at most this many bytes
    go inside the control message instead of the input region (up to the server's
    limit, 64 KiB; 0 by default: measured no faster than the region, README "The
    co-located door"). ``spin_us``: how long a call polls for its answer before it
    sleeps, when it is the client's only call in flight (:data:`DEFAULT_SPIN_US`; 0:
    never). ``grpc_options``: extra RouterClient arguments for the fallback.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        socket_path: str | Path | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        max_connections: int = 8,
        fallback: bool = True,
        inline_limit: int = 0,
        spin_us: int = DEFAULT_SPIN_US,
        **grpc_options: Any,
    ) -> None:
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        self._path = Path(socket_path) if socket_path is not None else local_socket_path(target)
        self._api_key = api_key
        self._timeout = timeout
        self._inline_limit = inline_limit
        self._spin_s = spin_us / 1e6
        self._in_flight = 0  # calls between taking a connection and giving it back
        self._round_trips: dict[int, float] = {}  # input size class -> recent seconds
        self._descriptions: dict[str, wire.Description] = {}
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._shared = SharedBuffers()
        self._keeper: _Connection | None = None  # registers the shared buffers, nothing else
        self._keeper_lock = threading.Lock()
        self._grpc: RouterClient | None = None
        first = self._first_connection()
        if first is None:
            if not fallback:
                raise _transport_error("nothing listens there", self._path or Path("-"))
            self._grpc = RouterClient(target, api_key=api_key, timeout=timeout, **grpc_options)
        else:
            self._idle.append(first)

    def _first_connection(self) -> _Connection | None:
        if self._path is None:
            return None
        try:
            return self._connect()
        except UnavailableError:
            return None

    def _connect(self) -> _Connection:
        assert self._path is not None
        session = Session(self._api_key, self._descriptions, inline_limit=self._inline_limit)
        try:
            return _Connection(self._path, session, self._timeout or 10.0)
        except OSError as exc:  # absent, refused, or not a socket
            raise _transport_error(exc.strerror or str(exc), self._path) from exc

    @property
    def transport(self) -> str:
        """``"colocated"`` or ``"grpc"`` (the fallback)."""
        return "grpc" if self._grpc is not None else "colocated"

    def route(
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
        """Route one batch of tokens ``[T, D]`` or ``[B, S, D]`` for one MoE layer
        (RouterClient.route's arguments and answer).

        ``input_ids`` (int32/int64, the leading dims of hidden_states): the tokens' ids,
        required by hash routers and refused by the others. ``return_losses``: the answer
        carries the call's aux and z losses.
        """
        arguments = dict(locals())
        del arguments["self"]
        if self._grpc is not None:
            return self._grpc.route(**arguments)
        deadline = _Deadline(timeout if timeout is not None else self._timeout)
        size = _size_class(hidden_states)
        with self._slots:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
                self._in_flight += 1
                # Only a call that starts alone polls (so at most one call of this client
                # polls at a time): polling threads would take the cores the server needs
                # to answer them. Calls of a size that took longer sleep too.
                recent = self._round_trips.get(size)
                spin_s = self._spin_s if (
                    self._in_flight == 1 and recent is not None and recent <= self._spin_s
                ) else 0.0
            try:
                if connection is None:
                    connection = self._connect()
                started = time.perf_counter()
                result = connection.run(connection.session.route(
                    router, hidden_states, layer, timeout_s=deadline.left,
                    shared=self._shared, **_route_arguments(arguments),
                ), deadline, spin_s)
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._round_trips[size] = elapsed if recent is None else (
                        recent + 0.2 * (elapsed - recent))
                return result  # type: ignore[no-any-return]
            finally:
                with self._lock:
                    self._in_flight -= 1
                    if connection is not None and not connection.broken:
                        self._idle.append(connection)
                if connection is not None and connection.broken:
                    connection.close()  # the server may still read its region: never reuse

    def shared_buffer(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        """An empty array of ``shape`` and ``dtype`` in shared memory the server has mapped:
        a torch tensor for a torch dtype (``torch.bfloat16`` included), else a numpy array.
        Passed to :meth:`route` (whole, or a contiguous slice) it is read where it lies,
        not copied. See :mod:`moe_router_client.colocated_shared`. On the gRPC fallback
        it is an ordinary array."""
        shape = tuple(int(d) for d in shape)
        if self._grpc is not None:
            return plain_array(shape, dtype)
        region = MemfdRegion(self._shared.new_name(), max(1, nbytes_of(shape, dtype)))
        with self._keeper_lock:  # one exchange at a time on the keeper's socket
            if self._keeper is None:
                self._keeper = self._connect()
            self._keeper.run(self._keeper.session.register(region),
                             _Deadline(self._timeout or 10.0))
        self._shared.add(region)
        return shared_array(region.mapping, shape, dtype)

    def close(self) -> None:
        """Close every connection (the server unregisters their regions) or the channel."""
        if self._grpc is not None:
            self._grpc.close()
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        with self._keeper_lock:
            keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.close()
        self._shared.close()

    def __enter__(self) -> CoLocatedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
