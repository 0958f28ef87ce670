"""A raw co-located door connection for tests: sends any message the wire can say (also
ones the client never would: references into other regions, past a region's end, to
unregistered names) and returns the decoded answer."""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import socket
from pathlib import Path

import numpy as np

from moe_router_client import colocated_wire as wire
from moe_router_client.tensors import to_parts


def sealed_memfd(size: int, *, seal: bool = True) -> tuple[int, mmap.mmap]:
    """(descriptor, mapping) of a memfd of ``size`` bytes, sealed against shrinking."""
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd, mmap.mmap(fd, size)


class RawDoor:
    """One connection; ``call(message)`` sends it and returns the decoded answer."""

    def __init__(self, path: Path | str, api_key: str = "", *, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self._seq = itertools.count(1)
        if hello:
            answer = self.call(wire.Hello(0, api_key, os.getpid()))
            assert isinstance(answer, wire.Welcome), answer

    def seq(self) -> int:
        return next(self._seq)

    def send_bytes(self, data: bytes, fds: list[int] | None = None) -> wire.Message | None:
        """Send a datagram; the answer, or None when the server closed the connection."""
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)
        answer = self.sock.recv(1 << 18)
        return wire.decode(answer) if answer else None

    def call(self, message: wire.Message, fds: list[int] | None = None) -> wire.Message | None:
        if hasattr(message, "seq") and message.seq == 0:
            message = type(message)(**{**message.__dict__, "seq": self.seq()})
        return self.send_bytes(wire.encode(message), fds)

    def register_memfd(self, name: str, size: int, *, seal: bool = True) -> mmap.mmap:
        fd, mapping = sealed_memfd(size, seal=seal)
        try:
            answer = self.call(wire.Register(0, name, "", 0, size), [fd])
        finally:
            os.close(fd)
        assert isinstance(answer, wire.Ok), answer
        return mapping

    def route(self, router: str, tensors: list[wire.TensorRef], output: wire.RegionRef,
              **options: object) -> wire.Message | None:
        return self.call(wire.Route(0, router, int(options.pop("layer", 0)), output,
                                    tuple(tensors), **options))  # type: ignore[arg-type]

    def close(self) -> None:
        self.sock.close()


def hidden_ref(array: np.ndarray, region: str | None = None, offset: int = 0,
               byte_size: int | None = None) -> wire.TensorRef:
    """hidden_states as a reference into ``region`` (or inline when region is None)."""
    dtype, shape, storage = to_parts(array)
    if region is None:
        return wire.TensorRef("hidden_states", dtype, shape, None,
                              memoryview(storage.reshape(-1).view(np.uint8)))
    size = storage.nbytes if byte_size is None else byte_size
    return wire.TensorRef("hidden_states", dtype, shape, wire.RegionRef(region, offset, size))
