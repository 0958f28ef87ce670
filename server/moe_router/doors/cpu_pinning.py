"""``server.event_loop_cpu``: the event loop and gRPC's completion-queue thread on one CPU.

Every call passes through two threads: gRPC's completion-queue poller, which takes the
call's events from gRPC core, and the event loop, which the poller wakes for each of
them. On different CPUs each hand-over is a cross-CPU wake-up (on a VM an interrupt to
a halted vCPU), and the loop's Python then runs on a core whose caches held other work.
Pinned together, one caller's 1-token Route went from about 600 to 500 us p50 on this
project's 2-core VM; both threads then share one core, so 16 callers of 1 token got
about 10% fewer calls a second there. The process's other threads (gRPC core's own, the
device pool, the HTTP endpoints) keep every CPU it may use.

Threads inherit the CPUs of the thread that starts them, so the threads the loop starts
afterwards (device workers, ``asyncio.to_thread``'s) start through
:meth:`PinnedThreads.release_thread`, which hands them the process's CPUs back.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from moe_router.errors import RouterConfigurationError

__all__ = ["PinnedThreads", "pin_event_loop"]

log = logging.getLogger("moe_router")

#: gRPC's asyncio completion-queue thread is ``threading.Thread(target=..._poll_wrapper)``.
_POLLER_TARGET = "(_poll_wrapper)"


@dataclass(frozen=True)
class PinnedThreads:
    """Threads pinned to ``cpu`` (native ids); ``released``: the CPUs every other thread
    keeps, the process's own when it was pinned."""

    cpu: int
    loop_thread: int
    poller_thread: int | None
    released: frozenset[int]

    def release_thread(self) -> None:
        """A thread initializer: the calling thread back on :attr:`released`."""
        os.sched_setaffinity(0, self.released)

    def restore(self) -> None:
        """Both threads back on :attr:`released` (an in-process server that stops)."""
        for thread in (self.loop_thread, self.poller_thread):
            if thread is not None:
                try:
                    os.sched_setaffinity(thread, self.released)
                except ProcessLookupError:  # the thread has ended
                    pass


def pin_event_loop(cpu: int) -> PinnedThreads:
    """Pin the calling thread (the event loop's) and gRPC's completion-queue thread to
    ``cpu``; call on the loop once the gRPC server exists. A CPU this process may not
    run on is a configuration error; no completion-queue thread (another gRPC engine)
    pins the loop alone, with a warning."""
    allowed = frozenset(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise RouterConfigurationError(
            f"server.event_loop_cpu: CPU {cpu} is not one this process may run on; "
            f"expected one of {_ranges(allowed)} (or null: no pinning)"
        )
    poller = next((t.native_id for t in threading.enumerate()
                   if t.name.endswith(_POLLER_TARGET) and t.native_id is not None), None)
    if poller is None:
        log.warning("server.event_loop_cpu: gRPC's completion-queue thread was not found; "
                    "pinning the event loop alone to CPU %d", cpu)
    else:
        os.sched_setaffinity(poller, {cpu})
    os.sched_setaffinity(0, {cpu})
    loop_thread = threading.get_native_id()
    log.info("event loop and gRPC's completion-queue thread pinned to CPU %d; other "
             "threads on %s", cpu, _ranges(allowed))
    return PinnedThreads(cpu, loop_thread, poller, allowed)


def _ranges(cpus: frozenset[int]) -> str:
    """``0-3,8`` for {0, 1, 2, 3, 8} (the notation of ``taskset`` and cpusets)."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
