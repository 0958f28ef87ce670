"""start_eagerly: a coroutine that never waits runs at once; one that waits becomes a task."""

from __future__ import annotations

import asyncio

import pytest

from moe_router.doors.eager_start import start_eagerly


def test_a_coroutine_that_never_waits_finishes_inside_the_call():
    done = []

    async def body():
        done.append("ran")

    async def main():
        assert start_eagerly(body()) is None
        assert done == ["ran"]  # before any turn of the loop

    asyncio.run(main())


def test_a_waiting_coroutine_runs_its_first_part_now_and_the_rest_as_a_task():
    steps = []

    async def body(gate):
        steps.append("before")
        value = await gate
        await asyncio.sleep(0)  # a bare yield
        steps.append(f"after {value}")

    async def main():
        gate = asyncio.get_running_loop().create_future()
        task = start_eagerly(body(gate))
        assert steps == ["before"] and task is not None
        gate.set_result(7)
        await task
        assert steps == ["before", "after 7"]

    asyncio.run(main())


def test_cancelling_the_task_cancels_what_it_waits_on_and_raises_inside():
    seen = []

    async def body(gate):
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    async def main():
        gate = asyncio.get_running_loop().create_future()
        task = start_eagerly(body(gate))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.cancelled() and seen == ["cancelled inside"]

    asyncio.run(main())
