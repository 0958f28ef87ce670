"""build_chain: the stages config.yaml switches on, in order, and their figures together."""

from __future__ import annotations

import asyncio
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from moe_router.chain.backend import RouteCall
from moe_router.chain.batcher import Batcher
from moe_router.chain.breaker import CircuitBreakerBackend
from moe_router.chain.cache import CacheBackend
from moe_router.chain.device import DeviceExecutor
from moe_router.chain.hosted import build_chain
from moe_router.chain.metrics import MetricsBackend, RouterMetrics
from moe_router.chain.ratelimit import RateLimitBackend
from moe_router.chain.request_stats import RequestStatsBackend
from moe_router.config import ServiceConfig, load_config
from moe_router.errors import NotFoundError, ValidationError
from moe_router.loading.registry import load_routers

ROUTERS = """\
routers:
  - {name: mixtral, kind: top_k, input_dim: 16, num_experts: 8, top_k: 2, layers: 3}
  - {name: choice, kind: expert_choice, input_dim: 16, num_experts: 4, capacity_factor: 1.0}
"""


def _config(tmp_path: Path, head: str = "") -> ServiceConfig:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(head) + ROUTERS)
    return load_config(path, env={})


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _stages(chain) -> list[type]:
    """Stage classes from the outermost inwards."""
    stages, stage = [], chain
    while not isinstance(stage, DeviceExecutor):
        stages.append(type(stage))
        stage = stage.device if isinstance(stage, Batcher) else getattr(
            stage, "_inner", None) or stage.inner
    return [*stages, DeviceExecutor]


def test_every_stage_in_the_documented_order(tmp_path: Path, pool) -> None:
    config = _config(tmp_path, "security: {rate_limit: 3600}\n")
    hosted = load_routers(config)["mixtral"]
    metrics = RouterMetrics(CollectorRegistry())
    chain = build_chain(hosted, config, pool, metrics)
    assert _stages(chain.chain) == [MetricsBackend, RequestStatsBackend, RateLimitBackend,
                                    CacheBackend, CircuitBreakerBackend, Batcher,
                                    DeviceExecutor]
    assert chain.batches_across_requests


def test_stages_switched_off_are_absent(tmp_path: Path, pool) -> None:
    config = _config(tmp_path, """\
        cache: {enabled: false}
        breaker: {enabled: false}
        batching: {enabled: false}
        """)
    hosted = load_routers(config)["mixtral"]
    chain = build_chain(hosted, config, pool, None)
    assert _stages(chain.chain) == [RequestStatsBackend, DeviceExecutor]
    figures = chain.figures()
    assert figures.cache is None and figures.breaker is None and figures.batcher is None
    assert not chain.batches_across_requests


def test_token_coupled_router_never_batches_across_requests(tmp_path: Path, pool) -> None:
    config = _config(tmp_path)
    chain = build_chain(load_routers(config)["choice"], config, pool, None)
    assert chain.batcher is not None and not chain.batches_across_requests


def test_figures_follow_calls_through_every_stage(tmp_path: Path, pool) -> None:
    config = _config(tmp_path)
    chain = build_chain(load_routers(config)["mixtral"], config, pool, None)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))

    async def run():
        first = await chain.chain.route(RouteCall("mixtral", 1, x))
        again = await chain.chain.route(RouteCall("mixtral", 1, x))
        with pytest.raises(NotFoundError, match="no layer 3; expected 0..2"):
            await chain.chain.route(RouteCall("mixtral", 3, x))
        with pytest.raises(ValidationError, match="dim 15 does not match"):
            await chain.chain.route(RouteCall("mixtral", 0, x[:, :15]))
        return first, again

    first, again = asyncio.run(run())
    assert again.cache_hit and not first.cache_hit
    figures = chain.figures()
    assert (figures.requests.requests, figures.requests.errors) == (4, 2)
    assert figures.requests.failures == 0 and figures.breaker.buffered_calls == 1
    # The cache hit's answer counts in the load too: experts compute for every answer.
    assert figures.requests.expert_load[1] == tuple((2 * first.output.tokens_per_expert).tolist())
    assert figures.cache.hit_count == 1 and figures.cache.miss_count == 2
    assert figures.device.passes == 1 and figures.device.calls == 1
    assert figures.batcher.device_batches == 1 and figures.batcher.queue_depth == 0
    alert = chain.alert_figures()
    assert alert.error_rate == 0.0 and alert.avg_latency_ms > 0


def test_each_call_is_validated_once(tmp_path: Path, pool, monkeypatch) -> None:
    config = _config(tmp_path, "cache: {enabled: false}\n")
    hosted = load_routers(config)["mixtral"]
    chain = build_chain(hosted, config, pool, None)
    router = hosted.layers[0]
    seen = []
    original = type(router).validate

    def counting(self, hidden_states, name=None):
        seen.append(hidden_states.shape)
        return original(self, hidden_states, name)

    monkeypatch.setattr(type(router), "validate", counting)

    async def run():
        calls = [RouteCall("mixtral", 0, torch.randn(n, 16)) for n in (1, 2, 3, 4)]
        return await asyncio.gather(*(chain.chain.route(c) for c in calls))

    results = asyncio.run(run())
    assert len(seen) == 4  # one admission per call, none in the worker
    assert max(r.batch_requests for r in results) > 1  # and some of them shared a pass


def test_rate_limit_buckets_are_shared_across_routers(tmp_path: Path, pool) -> None:
    config = _config(tmp_path, "security: {rate_limit: 60}\n")  # burst of one call
    hosted = load_routers(config)
    first = build_chain(hosted["mixtral"], config, pool, None)
    second = build_chain(hosted["choice"], config, pool, None,
                         rate_limit_shared_with=first.rate_limit)
    x = torch.randn(4, 16)

    async def run():
        await first.chain.route(RouteCall("mixtral", 0, x, peer="alice"))
        return await asyncio.gather(second.chain.route(RouteCall("choice", 0, x, peer="alice")),
                                    return_exceptions=True)

    (refused,) = asyncio.run(run())
    assert getattr(refused, "reason", None) == "RATE_LIMITED"
