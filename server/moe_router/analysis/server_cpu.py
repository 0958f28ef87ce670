"""CPU time a server process spends per call, read from outside it while a load runs.

On a machine whose cores the clients share with the server, the calls a server answers a
second under many callers are bounded by the CPU each call costs it, and in a Python
server by its event loop's thread above all (one thread holds the loop and the GIL). So
the bench reads, around the timed window of each load cell, the CPU time of the server's
whole process and of its main thread (where ``moe-router serve`` and the echo run their
event loop), and divides by the calls answered in the window.

The process's CPU time is the kernel's CPU clock of another process, the clock id glibc's
``clock_getcpuclockid`` makes (``(~pid << 3) | 2``): nanoseconds, no permission needed
beyond seeing the process. The kernel refuses that clock for a thread of another process,
so the main thread's comes from ``/proc/PID/task/PID/stat`` (user + system time, in clock
ticks: 10 ms on most kernels); its figures are given only for windows of at least
:data:`MIN_TICKS_PER_WINDOW` ticks, so that a reading's tick is at most 5% of the window.
Where either cannot be read (not Linux, the process gone) a reading is None and the cell
has no CPU figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CpuReading", "MIN_TICKS_PER_WINDOW", "ServerCpu", "read_cpu"]

_CPUCLOCK_SCHED = 2
MIN_TICKS_PER_WINDOW = 20
"""Shortest window, in clock ticks, whose main-thread figures are given."""


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds a process (all its threads, ended ones too) and its main thread had
    used at ``at`` (``time.monotonic()``)."""

    at: float
    process_s: float
    main_thread_s: float


def read_cpu(pid: int) -> CpuReading | None:
    """``pid``'s CPU clocks now; None where they cannot be read."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as stat:
            # after the command's closing parenthesis: state is field 3, utime 14, stime 15
            fields = stat.read().rpartition(b")")[2].split()
        main_thread_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        process_s = time.clock_gettime(~pid << 3 | _CPUCLOCK_SCHED)
    except (OSError, OverflowError, AttributeError, ValueError, IndexError):
        return None
    return CpuReading(time.monotonic(), process_s, main_thread_s)


@dataclass(frozen=True)
class ServerCpu:
    """A server's CPU over timed windows, and the calls it answered in them.

    process_s / main_thread_s: CPU seconds of the process / of its event loop's thread;
    wall_s: the windows' length; calls: calls that ended inside them; windows: how many.
    """

    process_s: float
    main_thread_s: float
    wall_s: float
    calls: int
    windows: int = 1

    @classmethod
    def between(cls, before: CpuReading, after: CpuReading, calls: int) -> ServerCpu:
        """The CPU from ``before`` to ``after`` for ``calls`` calls ended between them."""
        return cls(after.process_s - before.process_s,
                   after.main_thread_s - before.main_thread_s, after.at - before.at, calls)

    @classmethod
    def merged(cls, parts: Sequence[ServerCpu]) -> ServerCpu | None:
        """One figure for several windows (the rounds of a cell); None when there are none."""
        if not parts:
            return None
        return cls(sum(p.process_s for p in parts), sum(p.main_thread_s for p in parts),
                   sum(p.wall_s for p in parts), sum(p.calls for p in parts),
                   sum(p.windows for p in parts))

    @property
    def us_per_call(self) -> float | None:
        """Process CPU microseconds per call (None without calls)."""
        return self.process_s / self.calls * 1e6 if self.calls else None

    @property
    def loop_resolved(self) -> bool:
        """Whether the windows are long enough for the main thread's clock ticks."""
        tick_s = 1 / os.sysconf("SC_CLK_TCK")
        return self.wall_s >= MIN_TICKS_PER_WINDOW * tick_s * self.windows

    @property
    def loop_us_per_call(self) -> float | None:
        """Main-thread (event loop) CPU microseconds per call (None without calls or when
        the windows were too short for its ticks)."""
        return self.main_thread_s / self.calls * 1e6 if self.calls and self.loop_resolved \
            else None

    @property
    def loop_busy(self) -> float | None:
        """Share of the windows the main thread was on a CPU, 0-1 (1: the loop saturated;
        None when the windows were too short for its ticks)."""
        return self.main_thread_s / self.wall_s if self.loop_resolved else None
