"""The co-located door: Route for a serving stack on the same host, without gRPC on the
data path. Tensors lie in shared memory (host regions of the one
:class:`SharedMemoryRegistry` the Open Inference Protocol door uses too, or CUDA memory
by IPC handle); a few-dozen-byte control message per call goes over a unix socket.

Control path: ``AF_UNIX`` ``SOCK_SEQPACKET`` (stdlib), served on the server's event loop
(``loop.add_reader``). Chosen by ``scripts/measure_control_path.py`` (2 shared cores,
10,000 round trips of 100 bytes between two processes, p50 / p99 in microseconds):

    seqpacket, blocking both ends          10.1 /   40   <- the floor of a socket
    seqpacket, server on asyncio           12.7 /   88   <- this door's shape
    pyzmq REQ -> ROUTER ipc://, blocking   63   / 3650
    pyzmq DEALER -> ROUTER, zmq.asyncio   220   / 6350
    posix-ipc message queues, blocking      9.6 /   35
    posix-ipc semaphores + shared memory    6.9 /   10   (blocking waits only)

pyzmq's I/O thread costs two thread hops per message, which on two busy cores is 5-20x
the socket's cost; POSIX queues and semaphores are as fast but give the event loop no
file descriptor to wait on (a waiting thread would add the hop back). The socket also
brings what the door's safety needs: the kernel names the peer's uid and pid
(``SO_PEERCRED``), tells the server at once when a caller dies (end of file: its regions
are dropped), and carries file descriptors (``SCM_RIGHTS``), so a client's regions are
memfds that never have a name in ``/dev/shm``.

Safety, every rule enforced here or in the registry:

- same host only: a unix socket, in a 0700 directory of the server's user
  (``/tmp/moe-router-<uid>/`` by default, refused at start if it is anyone else's or
  open to others), the socket itself 0600; a peer whose uid is not the server's is
  refused at accept (``SO_PEERCRED``), whatever the file modes.
- API keys: with ``security.api_key_required`` the first message (HELLO) must carry one
  of the gRPC door's keys; its id (``security.key_id``) is the owner of the caller's
  regions and its rate-limit identity, as for gRPC. Without keys every local caller is
  one owner (as Triton has one namespace) and the rate-limit identity is ``unix:uid=N``.
- references: a region not registered by this owner, a span outside it, a shrunk file
  are INVALID_ARGUMENT from the registry before a view exists; a descriptor region must
  be a memfd sealed against shrinking (it can never shrink under a reader).
- nothing left in ``/dev/shm``: the server creates nothing there; a client's memfds are
  anonymous; regions registered through a connection are unregistered when it closes
  (a killed client's end of file). A killed server leaves its socket file, which the
  next start on that path removes (after checking nobody answers on it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_router.chain.backend import AfterAnswer
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.admission import Admission, Ticket
from moe_router.doors.colocated_convert import (
    RegionViews,
    describe,
    error_to_message,
    result_to_routed,
    route_to_call,
)
from moe_router.doors.colocated_socket import prepare_socket_path
from moe_router.doors.eager_start import start_eagerly
from moe_router.doors.health import HealthState
from moe_router.doors.security import key_id
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.errors import (
    AuthenticationError,
    DrainingError,
    DynamicMoEError,
    NotFoundError,
    ValidationError,
)
from moe_router_client import colocated_wire as wire

__all__ = ["INLINE_LIMIT_BYTES", "MAX_CONNECTIONS", "CoLocatedDoor"]

log = logging.getLogger("moe_router.doors.colocated")

INLINE_LIMIT_BYTES = 64 * 1024
"""Inputs up to this size may travel inside the ROUTE datagram instead of a region (the
WELCOME says so). Clients do not by default: 1 x 4096 fp32 measured the same either way
(p10 1115 us inline, 1104 us region, 3000 interleaved calls), so one path is used."""
MAX_CONNECTIONS = 256
_RECEIVE_BYTES = INLINE_LIMIT_BYTES + 64 * 1024  # one datagram: inline bytes + the refs
_PEERCRED = struct.Struct("3i")
_FD_SPACE = socket.CMSG_SPACE(4)


@dataclass(eq=False)
class _Connection:
    """One client socket: who it is and what it registered."""

    sock: socket.socket
    uid: int
    pid: int
    owner: str | None = None  # None until HELLO is accepted
    peer: str = ""
    regions: dict[str, object] = field(default_factory=dict)  # name -> RegionStatus
    outbox: deque[bytes] = field(default_factory=deque)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False
    views: RegionViews | None = None  # set with the owner, at HELLO


class CoLocatedDoor:
    """Serves co-located callers on ``socket_path`` over ``chains`` (filled as routers
    load), on the running event loop. ``start()`` binds, ``close()`` ends every
    connection, unregisters their regions and removes the socket file."""

    def __init__(
        self,
        chains: Mapping[str, HostedRouterChain],
        health: HealthState,
        regions: SharedMemoryRegistry,
        *,
        socket_path: Path,
        default_directory: bool,
        api_keys: Sequence[str] = (),
        device: torch.device,
        version: str,
        inline_limit: int = INLINE_LIMIT_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        admission: Admission,
    ) -> None:
        self.chains = chains
        self.health = health
        self.regions = regions
        # The server's, shared with the gRPC doors: the same bounds, and the drain holds
        # these calls too.
        self.admission = admission
        self.socket_path = Path(socket_path)
        self.device = device
        self.version = version
        self.inline_limit = inline_limit
        self._default_directory = default_directory
        self._keys = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in api_keys]
        self._max_connections = max_connections
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._buffer = bytearray(_RECEIVE_BYTES)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind and listen (call on the event loop that runs the chains)."""
        prepare_socket_path(self.socket_path, default_directory=self._default_directory)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._inode = self.socket_path.lstat().st_ino
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop serving: every connection closed (its regions unregistered), the socket
        file removed when it is still ours."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                if self.socket_path.lstat().st_ino == self._inode:
                    self.socket_path.unlink()
            except FileNotFoundError:
                pass
        for connection in list(self._connections):
            self._drop(connection)

    @property
    def connections(self) -> int:
        """Callers connected now."""
        return len(self._connections)

    # ------------------------------------------------------------------ accepting
    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: keep serving the others
                log.warning("co-located door: accept failed: %s", exc)
                return
            pid, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.geteuid() or len(self._connections) >= self._max_connections:
                why = "another user" if uid != os.geteuid() else "too many connections"
                log.warning("co-located door: refused pid %d uid %d (%s)", pid, uid, why)
                sock.close()
                continue
            sock.setblocking(False)
            connection = _Connection(sock, uid, pid)
            self._connections.add(connection)
            self._loop.add_reader(sock.fileno(), self._readable, connection)

    def _drop(self, connection: _Connection) -> None:
        """Close a connection: its reader, tasks and the regions it registered."""
        if connection.closed:
            return
        connection.closed = True
        self._connections.discard(connection)
        if self._loop is not None:
            self._loop.remove_reader(connection.sock.fileno())
            self._loop.remove_writer(connection.sock.fileno())
        for task in connection.tasks:
            task.cancel()
        if connection.owner is not None:
            for name, status in connection.regions.items():
                try:
                    current = self.regions.status(name, owner=connection.owner)[0]
                except NotFoundError:  # unregistered already (through either door)
                    continue
                if current is status:  # not a namesake registered since
                    self.regions.unregister(name, owner=connection.owner)
        connection.regions.clear()
        if connection.views is not None:
            connection.views.clear()
        connection.sock.close()

    # ------------------------------------------------------------------ receiving
    def _readable(self, connection: _Connection) -> None:
        """Read every datagram waiting on ``connection`` and answer each."""
        buffer = self._buffer
        while not connection.closed:
            try:
                nbytes, ancillary, flags, _ = connection.sock.recvmsg_into(
                    [buffer], _FD_SPACE
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(connection)
                return
            fds = _received_fds(ancillary)
            if nbytes == 0 and not fds:  # end of file: the caller closed or died
                self._drop(connection)
                return
            self._dispatch(connection, bytes(buffer[:nbytes]), fds, flags)

    def _dispatch(
        self, connection: _Connection, data: bytes, fds: list[int], flags: int
    ) -> None:
        seq = int.from_bytes(data[1:9], "little") if len(data) >= 9 else 0
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValidationError(
                    f"message longer than {_RECEIVE_BYTES} bytes (or with more than one "
                    "descriptor); put tensors larger than the inline limit in a region"
                )
            message = wire.decode(data)
            if isinstance(message, wire.Hello):
                self._hello(connection, message)
                return
            if connection.owner is None:
                raise AuthenticationError("send HELLO first (with the API key when the "
                                          "server requires one)")
            if isinstance(message, wire.Route):
                self._start_route(connection, message, len(data))
                return
            if isinstance(message, wire.Register):
                handed, fds = fds, []  # _register owns them from here (keeps or closes)
                answer: wire.Message = self._register(connection, message, handed)
            elif isinstance(message, wire.Unregister):
                answer = self._unregister(connection, message)
            elif isinstance(message, wire.Describe):
                answer = self._describe(message)
            else:
                raise ValidationError(f"{type(message).__name__} is an answer, not a request")
            self._send(connection, wire.encode(answer))
        except Exception as exc:  # answered, never kills the server
            self._send(connection, wire.encode(self._error(exc, seq)))
            if isinstance(exc, AuthenticationError):
                self._drop(connection)
        finally:
            for fd in fds:
                os.close(fd)

    def _error(self, exc: BaseException, seq: int, request_id: str = "") -> wire.Error:
        if isinstance(exc, wire.WireError):
            exc = ValidationError(f"malformed co-located message: {exc}")
        elif not isinstance(exc, DynamicMoEError):
            log.exception("internal error (request id %s)", request_id or "-", exc_info=exc)
        return error_to_message(exc, seq, request_id)

    # ------------------------------------------------------------------ requests
    def _hello(self, connection: _Connection, message: wire.Hello) -> None:
        if connection.owner is not None:  # its regions belong to the identity it has
            raise ValidationError("HELLO was already accepted on this connection; open "
                                  "another connection for another API key")
        if message.version != wire.PROTOCOL_VERSION:
            raise ValidationError(f"protocol version {message.version}; this server speaks "
                                  f"{wire.PROTOCOL_VERSION} (upgrade the client)")
        identity = ""
        if self._keys:
            identity = self._match(message.api_key)
            if not identity:
                raise AuthenticationError(
                    "invalid API key" if message.api_key else
                    "missing API key: pass api_key= to the co-located client"
                )
        connection.owner = identity
        connection.peer = identity or f"unix:uid={connection.uid}"
        connection.views = RegionViews(self.regions, identity)
        self._send(connection, wire.encode(wire.Welcome(
            message.seq, self.version, str(self.device), self.inline_limit
        )))

    def _match(self, token: str) -> str:
        """Key id of ``token`` or ""; compares against every key in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = ""
        for key_digest, identity in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = identity
        return found

    def _register(
        self, connection: _Connection, message: wire.Register, fds: list[int]
    ) -> wire.Ok:
        owner = connection.owner or ""
        if message.key:
            for fd in fds:
                os.close(fd)
            status = self.regions.register(message.name, message.key, message.offset,
                                           message.byte_size, owner=owner)
        else:
            if len(fds) != 1 or message.offset:
                for fd in fds:
                    os.close(fd)
                raise ValidationError(
                    f"shared memory region '{message.name[:100]}': without a key, send "
                    "exactly one file descriptor with the message, and offset 0"
                )
            status = self.regions.register_descriptor(
                message.name, fds[0], message.byte_size, owner=owner,
                label=f"pid{connection.pid}",
            )
        connection.regions[message.name] = status
        return wire.Ok(message.seq)

    def _unregister(self, connection: _Connection, message: wire.Unregister) -> wire.Ok:
        owner = connection.owner or ""
        names = [message.name] if message.name else list(connection.regions)
        for name in names:
            self.regions.unregister(name, owner=owner)
            connection.regions.pop(name, None)
        return wire.Ok(message.seq)

    def _check_loaded(self) -> None:
        """Calls are served once the routers are loaded, through the drain delay too;
        the drain's refusals come from admission (as the gRPC doors')."""
        if not self.health.loaded:
            raise DrainingError(
                "server is loading its routers; retry shortly or on another replica",
                retry_after_s=1.0,
                reason="DRAINING",
            )

    def _describe(self, message: wire.Describe) -> wire.Description:
        self._check_loaded()
        chain = self.chains.get(message.router)
        if chain is None:
            raise NotFoundError(
                f"unknown router '{message.router[:100]}'; this server hosts "
                f"{sorted(self.chains)}"
            )
        return describe(chain, message.seq)

    def _start_route(self, connection: _Connection, message: wire.Route, nbytes: int) -> None:
        """Run a ROUTE (a datagram of ``nbytes``) now, as far as it goes without waiting;
        only a call that waits (a pass in the pool, a batch) becomes a task. A call whose
        pass runs inline is then answered from this read, without a task or another turn
        of the loop."""
        task = start_eagerly(self._route(connection, message, nbytes))
        if task is not None:
            connection.tasks.add(task)
            task.add_done_callback(connection.tasks.discard)

    async def _route(self, connection: _Connection, message: wire.Route, nbytes: int) -> None:
        """Run one ROUTE through its router's chain and answer it; admitted (and held
        until its answer is sent) like a gRPC call."""
        views = connection.views
        assert views is not None  # a ROUTE is served only after HELLO
        request_id = message.request_id
        ticket: Ticket | None = None
        with AfterAnswer() as after:  # the chain's records of the call, once it is answered
            try:
                try:
                    self._check_loaded()
                    ticket = self.admission.enter_read(nbytes)
                    call = route_to_call(message, self.chains, views, peer=connection.peer,
                                         device=self.device, after_answer=after)
                    request_id = call.request_id
                    result = await self.chains[call.router].chain.route(call)
                    answer: wire.Message = result_to_routed(result, call, message, views)
                except Exception as exc:  # answered, never kills the server
                    answer = self._error(exc, message.seq, request_id)
                self._send(connection, wire.encode(answer))
            finally:
                if ticket is not None:
                    ticket.release()

    # ------------------------------------------------------------------ sending
    def _send(self, connection: _Connection, data: bytes) -> None:
        if connection.closed:
            return
        if connection.outbox:
            connection.outbox.append(data)
            return
        try:
            connection.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            connection.outbox.append(data)
            assert self._loop is not None
            self._loop.add_writer(connection.sock.fileno(), self._flush, connection)
        except OSError:  # the caller is gone
            self._drop(connection)

    def _flush(self, connection: _Connection) -> None:
        while connection.outbox and not connection.closed:
            try:
                connection.sock.send(connection.outbox[0], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(connection)
                return
            connection.outbox.popleft()
        if self._loop is not None and not connection.closed:
            self._loop.remove_writer(connection.sock.fileno())


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """File descriptors that came with a datagram (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += struct.unpack(f"{usable // 4}i", data[:usable])
    return fds

