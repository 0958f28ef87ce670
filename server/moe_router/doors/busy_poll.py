"""BusyPollSelector: the server's event loop polls for a while before it sleeps.

A Route of a few tokens is a ping-pong: the caller sends, the server answers, the caller
sends the next layer's call a few hundred microseconds later. A loop that sleeps in
``epoll_wait`` between the two pays for waking up (the idle core halts, the wake-up is an
interrupt and a reschedule) and then runs its first microseconds on cold caches.
Measured on the 2-core development machine (one blocking caller, 1 x 4096 fp32 Mixtral
calls, p50 of 4 s, three runs each): the co-located door 0.71-0.77 -> 0.56-0.59 ms with a
300 µs poll. The gRPC door gains little (1.47-1.56 -> 1.49-1.58 ms): its messages are
read by gRPC core's own thread, which still sleeps; a poll on every loop turn for 50 ms
after an event got it to 1.37 ms, but cost the calls that run in worker threads a sixth
more (DeepSeek-V3 16 tokens: they lose the core to the poll), so it is not done.

The rule keeps the cost bounded: after a ``select`` that returned events, the next one
polls (``epoll_wait`` with a zero timeout, yielding the core between polls) for at most
``spin_s`` or the loop's own timeout, whichever is shorter, then sleeps as usual. A poll
that found nothing does not poll again until events come: an idle server sleeps, and a
server with sparse traffic spends at most ``spin_s`` of CPU per wake-up. ``may_spin``
vetoes the poll while device passes run in worker threads, which need the core and the
GIL more than the loop needs a head start. The loop itself is never held: the poll
returns as soon as anything is ready.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable

__all__ = ["BusyPollSelector"]


class BusyPollSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's default selector, polling up to ``spin_s`` after each wake-up with
    events while ``may_spin()`` allows (see the module docstring). ``polls`` counts the
    zero-timeout polls made (for the tests and profiles)."""

    def __init__(self, spin_s: float, may_spin: Callable[[], bool] | None = None) -> None:
        super().__init__()
        if spin_s < 0:
            raise ValueError(f"spin_s must be >= 0, got {spin_s}")
        self.spin_s = spin_s
        self.may_spin: Callable[[], bool] = may_spin or (lambda: True)
        self.polls = 0
        self._armed = False

    def select(
        self, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        """As the default selector's ``select``, after a bounded poll when armed."""
        if self._armed and (timeout is None or timeout > 0):
            self._armed = False
            if self.may_spin():
                budget = self.spin_s if timeout is None else min(self.spin_s, timeout)
                stop = time.monotonic() + budget
                poll = super().select
                while True:
                    self.polls += 1
                    events = poll(0)
                    if events:
                        self._armed = True
                        return events
                    if time.monotonic() >= stop:
                        break
                    os.sched_yield()  # a runnable thread of this process takes the core
                if timeout is not None:
                    timeout = max(0.0, timeout - budget)
        events = super().select(timeout)
        self._armed = bool(events) and self.spin_s > 0
        return events
