"""Start a coroutine at once and make it a task only if it has to wait.

``asyncio.ensure_future`` always defers a coroutine to a later turn of the loop and
builds a Task for it. A co-located ROUTE whose pass runs inline never waits, so that
turn and that Task are pure cost (Python 3.12's eager tasks do the same thing; this
project runs on 3.11).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["start_eagerly"]


def start_eagerly(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coroutine`` up to its first wait; None when it finished without one, else the
    task that drives the rest of it."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_resume(coroutine, waiting_on))


async def _resume(coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive a started coroutine to its end as a task would: wait for the future it
    yielded (a bare ``yield``: one turn of the loop), then resume it. Cancelled, it does
    what a cancelled task does: cancels that future and raises CancelledError inside the
    coroutine (closing it if it goes on waiting)."""
    try:
        while True:
            if waiting_on is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait((waiting_on,))
            try:
                waiting_on = coroutine.send(None)
            except StopIteration:
                return
    except asyncio.CancelledError:
        if isinstance(waiting_on, asyncio.Future):
            waiting_on.cancel()
        try:
            coroutine.throw(asyncio.CancelledError())
        except (StopIteration, asyncio.CancelledError):
            pass
        else:
            coroutine.close()
        raise
