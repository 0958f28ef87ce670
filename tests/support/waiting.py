"""Waiting for what a server does in its own time (it reads an end of file, drops a
region): a poll with a bound, never a timing check."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(condition: Callable[[], bool], limit_s: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``limit_s`` passed (False)."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True
