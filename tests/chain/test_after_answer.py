"""AfterAnswer: what the stages record about an answered call waits for the door, and
what they record about a failure does not."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from moe_router.chain.backend import AT_ONCE, AfterAnswer, RouteCall
from moe_router.chain.hosted import HostedRouterChain, build_chain
from moe_router.chain.metrics import RouterMetrics
from moe_router.config import load_config
from moe_router.errors import NotFoundError
from moe_router.loading.registry import load_routers


def test_deferred_records_wait_for_run_and_keep_their_order() -> None:
    seen: list[tuple[str, int]] = []
    after = AfterAnswer()
    after.add(lambda name, n: seen.append((name, n)), "metrics", 1)
    after.add(lambda name, n: seen.append((name, n)), "stats", 2)
    assert seen == []
    after.run()
    assert seen == [("metrics", 1), ("stats", 2)]
    after.run()  # each record runs once
    assert seen == [("metrics", 1), ("stats", 2)]
    after.add(lambda: seen.append(("late", 3)))  # after run: at once
    assert seen[-1] == ("late", 3)


def test_a_with_block_runs_the_records_as_it_ends_even_when_cancelled() -> None:
    seen: list[str] = []
    with AfterAnswer() as after:
        after.add(seen.append, "answered")
        assert seen == []
    assert seen == ["answered"]
    with pytest.raises(asyncio.CancelledError), AfterAnswer() as after:
        after.add(seen.append, "cancelled")
        raise asyncio.CancelledError
    assert seen == ["answered", "cancelled"]


def test_at_once_runs_each_record_as_it_is_added() -> None:
    seen: list[int] = []
    AT_ONCE.add(seen.append, 7)
    assert seen == [7]
    assert RouteCall("r", 0, torch.zeros(1, 2)).after_answer is AT_ONCE


def test_a_record_that_raises_is_logged_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[int] = []
    after = AfterAnswer()

    def broken() -> None:
        raise RuntimeError("figures went wrong")

    after.add(broken)
    after.add(seen.append, 1)
    with caplog.at_level(logging.ERROR, logger="moe_router.chain.backend"):
        after.run()
    assert seen == [1]
    assert "recording an answered call failed" in caplog.text
    assert "figures went wrong" in caplog.text


def test_the_after_answer_is_not_part_of_a_calls_identity() -> None:
    x = torch.zeros(1, 2)
    assert RouteCall("r", 0, x) == RouteCall("r", 0, x, after_answer=AfterAnswer())


@pytest.fixture
def chain(tmp_path: Path):
    """The whole chain of a small router, inline passes allowed, as the server builds it."""
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        batching: {inline_max_us: 1000000}
        routers:
          - {name: mixtral, kind: top_k, input_dim: 16, num_experts: 8, top_k: 2, layers: 2}
        """))
    config = load_config(path, env={})
    registry = CollectorRegistry()
    with ThreadPoolExecutor(2) as pool:
        yield build_chain(load_routers(config)["mixtral"], config, pool,
                          RouterMetrics(registry)), registry


def _figures(hosted: HostedRouterChain, registry: CollectorRegistry) -> tuple:
    f = hosted.figures()
    requests = registry.get_sample_value(
        "moe_router_requests_total", {"router": "mixtral", "code": "OK"}) or 0.0
    assert f.breaker is not None and f.batcher is not None
    return (f.requests.requests, sum(f.requests.experts_per_token), f.device.passes,
            f.breaker.buffered_calls, f.batcher.device_batches, requests)


def _call(layer: int = 0, after: AfterAnswer = AT_ONCE) -> RouteCall:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(layer))
    return RouteCall("mixtral", layer, x, after_answer=after)


def test_every_stage_records_an_answer_only_when_the_door_runs_its_after_answer(
        chain) -> None:
    hosted, registry = chain

    async def scenario() -> None:
        await hosted.chain.route(_call())  # measures the pass: the next one runs inline
        assert hosted.executor.runs_inline(3)
        before = _figures(hosted, registry)
        assert before == (1, 3, 1, 1, 1, 1.0)
        after = AfterAnswer()
        result = await hosted.chain.route(_call(1, after))
        assert result.output.expert_indices.shape == (3, 2)
        # Answered, not recorded yet: requests, load, device passes, breaker window,
        # batches and the Prometheus counter all wait for the door.
        assert _figures(hosted, registry) == before
        after.run()
        assert _figures(hosted, registry) == (2, 6, 2, 2, 2, 2.0)
        assert hosted.figures().requests.expert_load[1] != (0,) * 8

    asyncio.run(scenario())


def test_a_failure_is_recorded_at_once_even_when_answers_wait(chain) -> None:
    hosted, registry = chain

    async def scenario() -> None:
        after = AfterAnswer()
        with pytest.raises(NotFoundError, match="no layer 5"):
            await hosted.chain.route(_call(5, after))
        figures = hosted.figures()
        assert (figures.requests.requests, figures.requests.errors) == (1, 1)
        assert registry.get_sample_value(
            "moe_router_requests_total", {"router": "mixtral", "code": "NOT_FOUND"}) == 1.0
        assert registry.get_sample_value(
            "moe_router_in_flight_requests", {"router": "mixtral"}) == 0.0

    asyncio.run(scenario())
