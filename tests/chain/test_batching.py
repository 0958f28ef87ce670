"""The dynamic batcher over a real router and device executor (no server)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_router.chain.backend import RouteCall, RouteOptions
from moe_router.chain.batcher import Batcher
from moe_router.chain.device import DeviceExecutor
from moe_router.errors import DeadlineExceededError, OverloadedError, ValidationError
from moe_router.routing import ExpertChoiceRouter, RouterConfig, TopKRouter

DIM = 48


def executor_for(router) -> DeviceExecutor:
    router.eval()
    return DeviceExecutor("r", [router], ["v1"], torch.device("cpu"), ThreadPoolExecutor(2))


def topk() -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(RouterConfig(hidden_size=DIM, num_experts=8, top_k=2))


def calls_of(sizes, seed=0, options=None):
    g = torch.Generator().manual_seed(seed)
    options = options or RouteOptions()
    return [RouteCall("r", 0, torch.randn(n, DIM, generator=g), options) for n in sizes]


async def route_all(batcher, calls):
    return await asyncio.gather(*(batcher.route(c) for c in calls), return_exceptions=True)


def test_merged_calls_answer_bit_identically_to_alone():
    router = topk()
    batcher = Batcher(executor_for(router), max_queue_delay_us=50_000)
    calls = calls_of([1, 3, 16, 17, 2, 40, 5, 1], options=RouteOptions(return_losses=True))
    results = asyncio.run(route_all(batcher, calls))
    # The first call finds the device idle and goes alone; the rest gather behind it.
    assert [r.batch_requests for r in results] == [1] + [len(calls) - 1] * (len(calls) - 1)
    assert results[-1].batch_tokens == sum(c.num_tokens for c in calls[1:])
    with torch.inference_mode():
        for call, result in zip(calls, results, strict=True):
            alone = router(call.hidden_states, return_losses=True)
            assert torch.equal(result.output.expert_indices, alone.expert_indices)
            assert torch.equal(result.output.expert_weights, alone.expert_weights)
            assert torch.equal(result.output.router_logits, alone.router_logits)
            assert torch.equal(result.output.aux_loss, alone.aux_loss)
            assert torch.equal(result.output.z_loss, alone.z_loss)


def test_a_bad_call_fails_alone_and_its_batch_mates_are_answered():
    batcher = Batcher(executor_for(topk()), max_queue_delay_us=50_000)
    calls = calls_of([1, 2, 3, 4])
    poisoned = calls[2].hidden_states.clone()
    poisoned[1, 5] = float("nan")
    expired = RouteCall("r", 0, calls[3].hidden_states, deadline=time.monotonic() - 1)
    # calls[0] occupies the device, so the next three gather into one pass.
    mixed = [calls[0], calls[1], RouteCall("r", 0, poisoned), expired]
    results = asyncio.run(route_all(batcher, mixed))
    assert results[1].output.expert_indices.shape == (2, 2)
    assert results[1].batch_requests == 3
    assert isinstance(results[2], ValidationError) and "1 non-finite" in str(results[2])
    assert isinstance(results[3], DeadlineExceededError)


def test_token_coupled_router_is_never_merged():
    router = ExpertChoiceRouter(RouterConfig(hidden_size=DIM, num_experts=4, capacity_factor=1.0))
    batcher = Batcher(executor_for(router), max_queue_delay_us=50_000)
    results = asyncio.run(route_all(batcher, calls_of([4, 4, 4])))
    assert [r.batch_requests for r in results] == [1, 1, 1]


def test_max_batch_tokens_splits_device_passes():
    batcher = Batcher(executor_for(topk()), max_batch_tokens=10, max_queue_delay_us=50_000)
    results = asyncio.run(route_all(batcher, calls_of([4, 4, 4, 4, 4])))
    assert all(r.batch_tokens <= 10 for r in results)
    assert [r.batch_requests for r in results] == [1, 2, 2, 2, 2]


def test_a_lone_call_on_an_idle_device_does_not_wait_for_the_timer():
    batcher = Batcher(executor_for(topk()), max_queue_delay_us=60_000_000)  # one minute
    result = asyncio.run(asyncio.wait_for(batcher.route(calls_of([3])[0]), timeout=30))
    assert result.batch_requests == 1


def test_full_queue_answers_overloaded_and_drains():
    batcher = Batcher(executor_for(topk()), max_queue_size=2, max_queue_delay_us=50_000)
    results = asyncio.run(route_all(batcher, calls_of([1, 1, 1, 1])))
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert len(refused) == 2 and all(r.reason == "QUEUE_FULL" for r in refused)
    assert "queue is full (2 calls waiting)" in str(refused[0])
    assert batcher.stats().queue_depth == 0
    assert asyncio.run(batcher.route(calls_of([1])[0])).output.expert_indices.shape == (1, 2)


def test_structural_errors_are_raised_before_queueing():
    batcher = Batcher(executor_for(topk()))
    with pytest.raises(ValidationError, match="dim 7 does not match router 'r' input_dim 48"):
        asyncio.run(batcher.route(RouteCall("r", 0, torch.zeros(2, 7))))
    assert batcher.stats().queue_depth == 0
