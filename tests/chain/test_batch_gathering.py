"""The batcher gathers calls on their way for a pass on the event loop (no server).

A call that finds the device idle and its pass cheap runs at once, alone, unless other
calls are on their way: callbacks queued on the loop, or messages the doors are reading.
Checked over a real router and device executor whose passes run on the loop.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from moe_router.chain.backend import RouteCall
from moe_router.chain.batcher import Batcher, _loop_has_work_queued
from moe_router.chain.device import DeviceExecutor
from moe_router.routing import RouterConfig, TopKRouter

DIM = 48


def _router() -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(RouterConfig(hidden_size=DIM, num_experts=8, top_k=2)).eval()


def _inline_executor(router: TopKRouter) -> DeviceExecutor:
    """An executor whose passes of up to 64 tokens run on the loop once measured."""
    executor = DeviceExecutor("r", [router], ["v1"], torch.device("cpu"), ThreadPoolExecutor(2),
                              inline_max_us=5_000_000)
    for tokens in (1, 2, 4, 8, 16, 32, 64):  # each size class measured once, in the pool
        asyncio.run(Batcher(executor).route(_calls([tokens])[0]))
    return executor


def _calls(sizes, seed=0) -> list[RouteCall]:
    g = torch.Generator().manual_seed(seed)
    return [RouteCall("r", 0, torch.randn(n, DIM, generator=g)) for n in sizes]


def test_the_loop_keeps_its_ready_queue_where_the_batcher_reads_it() -> None:
    """Pins the asyncio detail the gathering rests on (``BaseEventLoop._ready``)."""
    async def main() -> tuple[bool, bool]:
        asyncio.get_running_loop().call_soon(lambda: None)
        queued = _loop_has_work_queued()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return queued, _loop_has_work_queued()

    assert asyncio.run(main()) == (True, False)


def test_calls_started_in_one_turn_share_one_pass_on_the_loop() -> None:
    router = _router()
    executor = _inline_executor(router)
    batcher = Batcher(executor, max_queue_delay_us=60_000_000, gather_min_pass_s=0)
    calls = _calls([1, 3, 1, 2, 1, 1, 4, 1], seed=1)
    inline_before = executor._inline_passes

    async def main():
        return await asyncio.gather(*(batcher.route(c) for c in calls))

    results = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert [r.batch_requests for r in results] == [len(calls)] * len(calls)
    assert executor._inline_passes == inline_before + 1
    with torch.inference_mode():
        for call, result in zip(calls, results, strict=True):
            alone = router(call.hidden_states)
            assert torch.equal(result.output.expert_indices, alone.expert_indices)
            assert torch.equal(result.output.expert_weights, alone.expert_weights)
            assert torch.equal(result.output.router_logits, alone.router_logits)


def test_a_lone_call_with_nothing_on_its_way_runs_at_once() -> None:
    executor = _inline_executor(_router())
    batcher = Batcher(executor, max_queue_delay_us=60_000_000, calls_reading=lambda: 0,
                      gather_min_pass_s=0)
    result = asyncio.run(asyncio.wait_for(batcher.route(_calls([2])[0]), timeout=30))
    assert result.batch_requests == 1
    assert not batcher._timers and not batcher._queues


def test_a_call_waits_for_a_call_being_read_and_shares_its_pass() -> None:
    executor = _inline_executor(_router())
    reading = [1]
    batcher = Batcher(executor, max_queue_delay_us=60_000_000, calls_reading=lambda: reading[0],
                      gather_min_pass_s=0)
    first, second = _calls([1, 2], seed=2)

    async def main():
        waiting = asyncio.ensure_future(batcher.route(first))
        await asyncio.sleep(0.05)  # the other call's message is still arriving
        assert not waiting.done()
        reading[0] = 0  # read: its call reaches the batcher
        return await asyncio.gather(waiting, batcher.route(second))

    results = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert [r.batch_requests for r in results] == [2, 2]


def test_a_call_waits_for_calls_being_read_no_longer_than_the_queue_delay() -> None:
    executor = _inline_executor(_router())
    batcher = Batcher(executor, max_queue_delay_us=50_000, calls_reading=lambda: 1,
                      gather_min_pass_s=0)
    started = time.monotonic()
    result = asyncio.run(asyncio.wait_for(batcher.route(_calls([1])[0]), timeout=30))
    assert result.batch_requests == 1
    assert time.monotonic() - started >= 0.05


def test_no_queue_delay_means_no_gathering() -> None:
    executor = _inline_executor(_router())
    batcher = Batcher(executor, max_queue_delay_us=0, calls_reading=lambda: 1, gather_min_pass_s=0)
    result = asyncio.run(asyncio.wait_for(batcher.route(_calls([1])[0]), timeout=30))
    assert result.batch_requests == 1 and not batcher._timers


def test_a_call_whose_pass_is_cheaper_than_sharing_it_runs_at_once() -> None:
    executor = _inline_executor(_router())
    executor._pass_cost[1] = 50e-6  # 1-token passes measured at 50 us
    batcher = Batcher(executor, max_queue_delay_us=60_000_000, calls_reading=lambda: 1,
                      gather_min_pass_s=100e-6)
    result = asyncio.run(asyncio.wait_for(batcher.route(_calls([1])[0]), timeout=30))
    assert result.batch_requests == 1 and not batcher._timers
    executor._pass_cost[1] = 200e-6  # now sharing pays: it waits for the call being read
    started = time.monotonic()
    batcher = Batcher(executor, max_queue_delay_us=50_000, calls_reading=lambda: 1,
                      gather_min_pass_s=100e-6)
    asyncio.run(asyncio.wait_for(batcher.route(_calls([1])[0]), timeout=30))
    assert time.monotonic() - started >= 0.05


def test_gathered_calls_are_not_merged_past_a_size_too_costly_on_the_loop() -> None:
    """Calls that each ran on the loop stay there: a gathered pass stops short of a size
    measured above the inline budget, rather than going to a worker thread."""
    executor = _inline_executor(_router())
    executor._pass_cost[8] = 60.0  # passes of 5-8 tokens measured at a minute
    batcher = Batcher(executor, max_queue_delay_us=60_000_000, gather_min_pass_s=0)
    calls = _calls([2, 2, 2, 2, 2], seed=3)

    async def main():
        return await asyncio.gather(*(batcher.route(c) for c in calls))

    results = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert [r.batch_tokens for r in results] == [4, 4, 4, 4, 2]
