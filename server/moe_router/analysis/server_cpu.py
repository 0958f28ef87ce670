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

A call counts for the share of its time that lies inside the window, as if its CPU were
spread evenly over it; the calls in flight as the window opens and closes are what that
guesses at, so the per-call figures are given only when the window holds at least
:data:`MIN_CALLS_PER_CALLER` calls for each call that can be in flight at once (a
2048-token call of 170 ms in a 0.4 s window has none).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CpuReading", "MIN_CALLS_PER_CALLER", "MIN_TICKS_PER_WINDOW", "ServerCpu",
           "calls_inside", "read_cpu"]

_CPUCLOCK_SCHED = 2
MIN_TICKS_PER_WINDOW = 20
"""Shortest window, in clock ticks, whose main-thread figures are given."""
MIN_CALLS_PER_CALLER = 10
"""Fewest calls in a window, per call in flight at once, whose per-call figures are given."""


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
    wall_s: the windows' length; calls: the calls inside them (:func:`calls_inside`);
    in_flight: the most calls in flight at once, summed over the windows; windows: how many.
    """

    process_s: float
    main_thread_s: float
    wall_s: float
    calls: float
    in_flight: int = 1
    windows: int = 1

    @classmethod
    def between(cls, before: CpuReading, after: CpuReading, calls: float,
                in_flight: int = 1) -> ServerCpu:
        """The CPU from ``before`` to ``after`` for ``calls`` calls inside that window, of
        which at most ``in_flight`` ran at once."""
        return cls(after.process_s - before.process_s,
                   after.main_thread_s - before.main_thread_s, after.at - before.at, calls,
                   in_flight)

    @classmethod
    def merged(cls, parts: Sequence[ServerCpu]) -> ServerCpu | None:
        """One figure for several windows (the rounds of a cell); None when there are none."""
        if not parts:
            return None
        return cls(sum(p.process_s for p in parts), sum(p.main_thread_s for p in parts),
                   sum(p.wall_s for p in parts), sum(p.calls for p in parts),
                   sum(p.in_flight for p in parts), sum(p.windows for p in parts))

    @property
    def calls_resolved(self) -> bool:
        """Whether the windows hold enough calls for the ones at their edges not to matter."""
        return self.calls > 0 and self.calls >= MIN_CALLS_PER_CALLER * self.in_flight

    @property
    def us_per_call(self) -> float | None:
        """Process CPU microseconds per call (None when too few calls: module docstring)."""
        return self.process_s / self.calls * 1e6 if self.calls_resolved else None

    @property
    def loop_resolved(self) -> bool:
        """Whether the windows are long enough for the main thread's clock ticks."""
        tick_s = 1 / os.sysconf("SC_CLK_TCK")
        return self.wall_s >= MIN_TICKS_PER_WINDOW * tick_s * self.windows

    @property
    def loop_us_per_call(self) -> float | None:
        """Main-thread (event loop) CPU microseconds per call (None when too few calls or
        when the windows were too short for its ticks)."""
        return self.main_thread_s / self.calls * 1e6 \
            if self.calls_resolved and self.loop_resolved else None

    @property
    def loop_busy(self) -> float | None:
        """Share of the windows the main thread was on a CPU, 0-1 (1: the loop saturated;
        None when the windows were too short for its ticks)."""
        return self.main_thread_s / self.wall_s if self.loop_resolved else None


def calls_inside(starts: Sequence[float], ends: Sequence[float], opened: float,
                 closed: float) -> float:
    """How many calls lie inside the window ``[opened, closed]``: each call (its start and
    end on the same clock) counts for the share of its time inside it."""
    inside = 0.0
    for start, end in zip(starts, ends, strict=True):
        overlap = min(end, closed) - max(start, opened)
        if overlap > 0:
            inside += overlap / (end - start) if end > start else 1.0
        elif opened <= end <= closed:  # a call of no measurable length
            inside += 1.0
    return inside
