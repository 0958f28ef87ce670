"""Round-trip p50 of a small message between two processes, for the candidate control
paths of the co-located door (``moe_router.doors.colocated``).

    python scripts/measure_control_path.py [--messages 20000] [--size 100]

Each candidate runs an echo server in a child process and a client here that sends one
``--size``-byte message and waits for the echo, ``--messages`` times after a warm-up;
the p50/p99 of those round trips are printed. Candidates whose library is not installed
are skipped (pyzmq, posix-ipc are not dependencies of moe-router: only the stdlib
candidate is what the door uses, and this script is why).

- ``seqpacket``        AF_UNIX SOCK_SEQPACKET, blocking recv/send on both sides (the floor)
- ``seqpacket-asyncio`` the same socket, the server on an asyncio loop (``loop.sock_recv``)
                        as the door's server runs (the chain is asyncio)
- ``zmq-rep``           pyzmq REQ -> ROUTER over ipc://, blocking server
- ``zmq-asyncio``       pyzmq DEALER -> ROUTER over ipc://, server on zmq.asyncio
- ``posix-mq``          two POSIX message queues (posix-ipc), blocking both sides
- ``posix-sem``         two POSIX semaphores as doorbells, the payload in shared memory
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------- servers (child)
def serve_seqpacket(address: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    while data := conn.recv(65536):
        conn.send(data)


def serve_seqpacket_asyncio(address: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(address)
        listener.listen(1)
        listener.setblocking(False)
        print("ready", flush=True)
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        while data := await loop.sock_recv(conn, 65536):
            await loop.sock_sendall(conn, data)

    asyncio.run(main())


def serve_zmq_rep(address: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"ipc://{address}")
    print("ready", flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[-1].bytes == b"stop":
            return
        sock.send_multipart(frames, copy=False)


def serve_zmq_asyncio(address: str) -> None:
    import zmq
    import zmq.asyncio

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"ipc://{address}")
        print("ready", flush=True)
        while True:
            frames = await sock.recv_multipart(copy=False)
            if frames[-1].bytes == b"stop":
                return
            await sock.send_multipart(frames, copy=False)

    asyncio.run(main())


def serve_posix_mq(address: str) -> None:
    import posix_ipc

    name = "/" + Path(address).name
    requests = posix_ipc.MessageQueue(name + "-req", posix_ipc.O_CREX, max_message_size=8192)
    answers = posix_ipc.MessageQueue(name + "-ans", posix_ipc.O_CREX, max_message_size=8192)
    print("ready", flush=True)
    try:
        while True:
            data, _ = requests.receive()
            if data == b"stop":
                return
            answers.send(data)
    finally:
        requests.unlink()
        answers.unlink()


def serve_posix_sem(address: str) -> None:
    import posix_ipc

    name = "/" + Path(address).name
    ring = posix_ipc.SharedMemory(name + "-shm", posix_ipc.O_CREX, size=65536)
    view = mmap.mmap(ring.fd, 65536)
    bell = posix_ipc.Semaphore(name + "-req", posix_ipc.O_CREX)
    done = posix_ipc.Semaphore(name + "-ans", posix_ipc.O_CREX)
    print("ready", flush=True)
    try:
        while True:
            bell.acquire()
            if view[0] == 0xFF:
                return
            view[0] ^= 1  # "answer": touch the payload
            done.release()
    finally:
        for thing in (ring, bell, done):
            thing.unlink()


SERVERS: dict[str, Callable[[str], None]] = {
    "seqpacket": serve_seqpacket,
    "seqpacket-asyncio": serve_seqpacket_asyncio,
    "zmq-rep": serve_zmq_rep,
    "zmq-asyncio": serve_zmq_asyncio,
    "posix-mq": serve_posix_mq,
    "posix-sem": serve_posix_sem,
}
NEEDS = {"zmq-rep": "zmq", "zmq-asyncio": "zmq", "posix-mq": "posix_ipc",
         "posix-sem": "posix_ipc"}


# ---------------------------------------------------------------------- clients (here)
def _client(kind: str, address: str, size: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one round trip, close) for ``kind``."""
    payload = os.urandom(size)
    if kind.startswith("seqpacket"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(address)

        def trip() -> None:
            sock.send(payload)
            sock.recv(65536)

        return trip, sock.close
    if kind.startswith("zmq"):
        import zmq

        ctx = zmq.Context()
        zsock = ctx.socket(zmq.REQ if kind == "zmq-rep" else zmq.DEALER)
        zsock.connect(f"ipc://{address}")
        frames = [payload] if kind == "zmq-rep" else [b"", payload]

        def ztrip() -> None:
            zsock.send_multipart(frames, copy=False)
            zsock.recv_multipart(copy=False)

        def zclose() -> None:
            if kind == "zmq-rep":
                zsock.send(b"stop")
            else:
                zsock.send_multipart([b"", b"stop"])
            time.sleep(0.1)
            zsock.close(0)
            ctx.term()

        return ztrip, zclose
    import posix_ipc

    name = "/" + Path(address).name
    if kind == "posix-mq":
        requests = posix_ipc.MessageQueue(name + "-req")
        answers = posix_ipc.MessageQueue(name + "-ans")

        def mtrip() -> None:
            requests.send(payload)
            answers.receive()

        return mtrip, lambda: requests.send(b"stop")
    ring = posix_ipc.SharedMemory(name + "-shm")
    view = mmap.mmap(ring.fd, 65536)
    bell = posix_ipc.Semaphore(name + "-req")
    done = posix_ipc.Semaphore(name + "-ans")

    def strip_() -> None:
        view[1 : 1 + size] = payload
        bell.release()
        done.acquire()

    def sclose() -> None:
        view[0] = 0xFF
        bell.release()

    return strip_, sclose


def measure(kind: str, messages: int, size: int) -> tuple[float, float] | None:
    """(p50, p99) round trip in microseconds, or None when the library is missing."""
    module = NEEDS.get(kind)
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            return None
    with tempfile.TemporaryDirectory(prefix="moe-ctl-") as tmp:
        address = str(Path(tmp) / f"ctl-{os.getpid()}")
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, address],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            trip, close = _client(kind, address, size)
            for _ in range(min(2000, messages)):
                trip()
            samples = []
            for _ in range(messages):
                start = time.perf_counter()
                trip()
                samples.append((time.perf_counter() - start) * 1e6)
            close()
            child.wait(5)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    return statistics.median(samples), _percentile(samples, 0.99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve[0]](args.serve[1])
        return 0
    print(f"{'candidate':<20} {'p50 us':>8} {'p99 us':>8}   ({args.messages} x "
          f"{args.size}-byte round trips)")
    for kind in SERVERS:
        figures = measure(kind, args.messages, args.size)
        if figures is None:
            print(f"{kind:<20} {'(library not installed)':>18}")
        else:
            print(f"{kind:<20} {figures[0]:8.1f} {figures[1]:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
