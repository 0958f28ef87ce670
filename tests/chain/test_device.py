"""DeviceExecutor: inline passes for cheap calls, loss sampling for the gauges."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_router.chain.backend import RouteCall, RouteOptions
from moe_router.chain.batcher import Batcher
from moe_router.chain.device import DeviceExecutor
from moe_router.errors import ValidationError
from moe_router.routing import RouterConfig, ScoringFunction, TopKRouter, fused_topk

DIM = 32


def _router() -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(RouterConfig(hidden_size=DIM, num_experts=8, top_k=2)).eval()


def _call(seed: int, tokens: int = 1, **options) -> RouteCall:
    x = torch.randn(tokens, DIM, generator=torch.Generator().manual_seed(seed))
    return RouteCall("r", 0, x, RouteOptions(**options))


class _ThreadRecorder(ThreadPoolExecutor):
    """A pool that remembers how many calls it was given."""

    def __init__(self) -> None:
        super().__init__(2)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_cheap_passes_run_on_the_loop_after_one_measured_pass_and_answer_the_same():
    router, pool = _router(), _ThreadRecorder()
    device = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), pool,
                            inline_max_us=1_000_000)
    calls = [_call(i) for i in range(5)]

    async def run():
        return [await device.route(call) for call in calls]

    results = asyncio.run(run())
    assert pool.submitted == 1  # the first pass measures its cost in the pool
    assert device.stats().inline_passes == 4 and device.stats().passes == 5
    with torch.inference_mode():
        for call, result in zip(calls, results, strict=True):
            alone = router(call.hidden_states)
            assert torch.equal(result.output.expert_indices, alone.expert_indices)
            assert torch.equal(result.output.expert_weights, alone.expert_weights)


def test_passes_over_the_budget_and_passes_beside_a_running_one_stay_in_the_pool():
    router, pool = _router(), _ThreadRecorder()
    never = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), pool, inline_max_us=0)

    async def sequential():
        for i in range(4):
            await never.route(_call(i))

    asyncio.run(sequential())
    assert pool.submitted == 4 and never.stats().inline_passes == 0
    # Generous budget, but concurrent calls: while a pass is in the pool the others queue
    # behind it in the batcher and go as one merged pass, never inline beside it.
    pool2 = _ThreadRecorder()
    device = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), pool2,
                            inline_max_us=1_000_000)
    batcher = Batcher(device, max_queue_delay_us=50_000)

    async def burst():
        return await asyncio.gather(*(batcher.route(_call(i, tokens=3)) for i in range(6)))

    results = asyncio.run(burst())
    assert pool2.submitted >= 1 and device.stats().inline_passes <= device.stats().passes - 1
    assert max(r.batch_requests for r in results) > 1


def test_one_call_a_second_computes_losses_for_the_gauges_and_answers_only_what_was_asked():
    router = _router()
    seen: list[tuple[float, float]] = []
    device = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), ThreadPoolExecutor(1),
                            on_losses=lambda aux, z: seen.append((aux, z)),
                            loss_sample_interval_s=3600.0)
    first, second = _call(1), _call(2, return_losses=True)

    async def run():
        return await device.route(first), await device.route(second), await device.route(first)

    a, b, c = asyncio.run(run())
    with torch.inference_mode():
        expected = router(first.hidden_states, return_losses=True)
    assert seen == [(float(expected.aux_loss), float(expected.z_loss))]  # one sample
    assert a.output.aux_loss is None and a.output.z_loss is None  # not asked: not answered
    assert b.output.aux_loss is not None and b.output.z_loss is not None  # asked
    assert c.output.aux_loss is None
    assert torch.equal(a.output.expert_weights, c.output.expert_weights)


@pytest.mark.parametrize("path", ["fused route", "fused selection", "pytorch"])
def test_top_k_values_are_judged_by_their_logits_and_a_bad_call_fails_alone(path: str):
    """Judged on the router's own verdict (the fused ops check the logits on the way) or
    on the logits afterwards (the PyTorch path): the same answers and refusals."""
    router = _router() if path != "fused selection" else TopKRouter(RouterConfig(
        hidden_size=DIM, num_experts=8, top_k=2, scoring=ScoringFunction.SIGMOID)).eval()
    router._fusable = path == "fused route" and router._fusable  # the selection op alone
    if path == "pytorch":
        router._selection_fusable = False
    device = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), ThreadPoolExecutor(1))
    good = _call(1, tokens=3)
    nan = _call(2, tokens=3)
    nan.hidden_states[1, 5] = float("nan")
    huge = RouteCall("r", 0, torch.full((2, DIM), 3e38))  # finite, but the logits are not

    async def run():
        admitted = [device.admit(c) for c in (good, nan, huge)]
        return await device.run_pass(admitted)

    first, second, third = asyncio.run(run())
    with torch.inference_mode():
        alone = router(good.hidden_states)
    assert torch.equal(first.output.expert_weights, alone.expert_weights)
    checked_on_the_way = path != "pytorch" and fused_topk.kernel_available()
    assert first.output.logits_bounded is (True if checked_on_the_way else None)
    assert isinstance(second, ValidationError) and "1 non-finite values" in str(second)
    assert isinstance(third, ValidationError) and "too large" in str(third)


class _SleepingRouter(TopKRouter):
    """A router that waits instead of computing: almost no CPU time, long wall time
    (on the calls in ``sleepy``, every call when None)."""

    sleepy: set[int] | None = None
    calls = 0

    def route_validated(self, *args, **kwargs):
        import time

        self.calls += 1
        if self.sleepy is None or self.calls in self.sleepy:
            time.sleep(0.05)
        return super().route_validated(*args, **kwargs)


def test_a_router_that_waits_holds_the_loop_twice_then_stays_off_it():
    torch.manual_seed(0)
    router = _SleepingRouter(RouterConfig(hidden_size=DIM, num_experts=8, top_k=2)).eval()
    pool = _ThreadRecorder()
    device = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), pool,
                            inline_max_us=5_000)  # 5 ms; each pass sleeps 50 ms

    async def run():
        for i in range(14):
            await device.route(_call(i))

    asyncio.run(run())
    # Pass 1 in the pool measures ~0 CPU time; pass 2 runs inline and takes 50 ms of wall
    # time (10x the budget), which lifts its size's mean cost over the budget: the next
    # passes go to the pool until the mean decays, then one more inline pass overruns,
    # the second in a row, and every later pass stays in the pool for INLINE_HOLD_S.
    assert device.stats().inline_passes == 2
    assert pool.submitted == 12
    assert device._inline_held_until > time.monotonic()


def test_one_stalled_inline_pass_does_not_keep_its_router_off_the_loop():
    torch.manual_seed(0)
    router = _SleepingRouter(RouterConfig(hidden_size=DIM, num_experts=8, top_k=2)).eval()
    router.sleepy = {3}  # a host that stalls the loop once, 50 ms (10x the budget)
    pool = _ThreadRecorder()
    device = DeviceExecutor("r", [router], ["v"], torch.device("cpu"), pool,
                            inline_max_us=5_000)

    async def run():
        for i in range(20):
            await device.route(_call(i))

    asyncio.run(run())
    assert device._inline_held_until == 0.0  # never held
    # After the stall's mean cost decays in the pool, the passes are back on the loop.
    assert device.stats().inline_passes >= 12
