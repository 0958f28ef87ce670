"""One hosted router: its loaded layers, its backend chain, and how it describes itself.

Chain, outermost first (DESIGN.md):
    Metrics -> RequestStats -> RateLimit -> Cache -> CircuitBreaker -> Batcher -> DeviceExecutor
Stages switched off in config.yaml are simply not in the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from moe_router.chain.backend import Backend
from moe_router.chain.batcher import Batcher
from moe_router.config import ServiceConfig
from moe_router.chain.device import DeviceExecutor
from moe_router.chain.breaker import CircuitBreakerBackend
from moe_router.chain.cache import CacheBackend, process_rss_bytes
from moe_router.chain.metrics import MetricsBackend, RouterMetrics
from moe_router.chain.ratelimit import RateLimitBackend
from moe_router.loading.registry import HostedRouter
from moe_router.chain.request_stats import RequestStatsBackend
from moe_router.routing import functional as F
from moe_router_client.v1 import router_pb2 as pb

__all__ = ["HostedRouterChain", "build_chain"]

_ACCEPTED_DTYPES = [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16]


@dataclass
class HostedRouterChain:
    """A router as the service sees it: the outermost Backend plus its named stages."""

    name: str
    hosted: HostedRouter
    executor: DeviceExecutor
    chain: Backend
    request_stats: RequestStatsBackend
    batcher: Batcher | None = None
    cache: CacheBackend | None = None
    breaker: CircuitBreakerBackend | None = None
    rate_limit: RateLimitBackend | None = None

    def describe(self) -> pb.RouterDescription:
        """The ListRouters entry of this router."""
        first = self.hosted.layers[0]
        low, high = first.k_range
        return pb.RouterDescription(
            name=self.name,
            kind=self.hosted.spec.kind.value,
            num_experts=first.num_experts,
            layers=len(self.hosted.layers),
            input_dim=first.hidden_size,
            min_k=low,
            max_k=high,
            accepted_dtypes=_ACCEPTED_DTYPES,
            version=self.hosted.versions[0],
            batches_across_requests=self.batcher is not None
            and not (first.couples_tokens_now or first.stateful or first.stochastic),
        )

    def alert_figures(self) -> dict[str, float | None]:
        """The four figures ``monitoring.alert_thresholds`` judges (None until traffic)."""
        latency = self.request_stats.latency()
        load = torch.stack(
            [torch.tensor(r.get_stats()["tokens_per_expert"]) for r in self.hosted.layers]
        ).sum(0).double()
        routed = float(load.sum())
        return {
            "avg_latency_ms": latency["mean_ms"] if latency["samples"] else None,
            # Failures only (a caller's bad input is not this router's error), last minute.
            "error_rate": self.request_stats.recent_failure_rate(),
            "load_balance_variance": float((load / routed).var(unbiased=False))
            if routed else None,
            "memory_usage_mb": process_rss_bytes() / 2**20,
        }

    def stats_proto(self) -> pb.RouterStats:
        """The Stats entry: request figures, per-expert load over all layers, cache, breaker."""
        layer_stats = [router.get_stats() for router in self.hosted.layers]
        per_layer = [torch.tensor(s["tokens_per_expert"], dtype=torch.int64) for s in layer_stats]
        load = torch.stack(per_layer).sum(0)
        loadf = load.double()
        tokens = sum(s["total_tokens"] for s in layer_stats)
        assignments = sum(s["avg_experts_per_token"] * s["total_tokens"] for s in layer_stats)
        latency = self.request_stats.latency()
        stats = pb.RouterStats(
            router=self.name,
            requests=self.request_stats.requests,
            tokens=self.request_stats.tokens,
            errors=self.request_stats.errors,
            tokens_per_expert=load.tolist(),
            load_balance_score=F.load_balance_score(load),
            usage_variance=float(loadf.var(unbiased=False)),
            most_used_expert=int(torch.argmax(load)),
            least_used_expert=int(torch.argmin(load)),
            avg_experts_per_token=assignments / tokens if tokens else 0.0,
            dropped_tokens=sum(s["dropped_tokens"] for s in layer_stats),
            latency=pb.LatencySummary(
                p50_ms=latency["p50_ms"],
                p95_ms=latency["p95_ms"],
                p99_ms=latency["p99_ms"],
                mean_ms=latency["mean_ms"],
                samples=int(latency["samples"]),
            ),
            layers=[
                pb.LayerLoad(layer=i, tokens_per_expert=c.tolist()) for i, c in enumerate(per_layer)
            ],
        )
        if self.cache is not None:
            c = self.cache.stats()
            stats.cache.CopyFrom(
                pb.CacheStats(
                    **{f: c[f] for f in pb.CacheStats.DESCRIPTOR.fields_by_name if f in c}
                )
            )
        if self.breaker is not None:
            b = self.breaker.stats()
            stats.breaker.CopyFrom(
                pb.BreakerStats(
                    **{f: b[f] for f in pb.BreakerStats.DESCRIPTOR.fields_by_name if f in b}
                )
            )
        return stats


def build_chain(
    hosted: HostedRouter,
    config: ServiceConfig,
    pool: Executor,
    metrics: RouterMetrics | None,
    on_breaker_change: Callable[[str, str, str], None] | None = None,
    rate_limit_shared_with: RateLimitBackend | None = None,
) -> HostedRouterChain:
    """Wrap one loaded router in the stages config.yaml switches on.

    ``rate_limit_shared_with``: another chain's limiter whose per-caller buckets this one
    shares (``security.rate_limit`` is per caller across all routers).
    """
    spec = hosted.spec
    name = spec.name
    executor = DeviceExecutor(name, hosted.layers, hosted.versions, hosted.device, pool)
    chain: Any = executor
    batcher = None
    if spec.batching.enabled:
        batching = spec.batching
        batcher = Batcher(
            executor,
            max_batch_tokens=batching.max_batch_tokens,
            max_queue_delay_us=batching.max_queue_delay_us,
            max_queue_size=batching.max_queue_size,
            on_batch=None if metrics is None else metrics.batch_observer(name),
            on_queue_depth=None if metrics is None else metrics.queue_depth_observer(name),
        )
        chain = batcher
    breaker = None
    if config.breaker.enabled:
        b = config.breaker
        breaker = CircuitBreakerBackend(
            chain,
            name=name,
            sliding_window_size=b.sliding_window_size,
            minimum_number_of_calls=b.minimum_number_of_calls,
            failure_rate_threshold=b.failure_rate_threshold,
            slow_call_rate_threshold=b.slow_call_rate_threshold,
            slow_call_duration_ms=b.slow_call_duration_ms,
            wait_duration_s=b.wait_duration_s,
            max_wait_duration_s=b.max_wait_duration_s,
            wait_multiplier=b.wait_multiplier,
            permitted_calls_in_half_open=b.permitted_calls_in_half_open,
            on_state_change=on_breaker_change,
        )
        chain = breaker
    cache = None
    if config.cache.enabled and spec.cache_enabled:
        c = config.cache
        first = hosted.layers[0]
        cache = CacheBackend(
            chain,
            router_version=lambda layer: hosted.versions[layer],
            stateful=first.stateful,
            stochastic=lambda call: executor.router_for(call.layer).stochastic,
            cache_size=c.cache_size,
            max_bytes=c.max_bytes,
            ttl_seconds=c.ttl_seconds,
            adaptive=c.adaptive,
            # Memory pressure: the process memory budget the alerts already use.
            rss_limit_bytes=int(config.monitoring.alert_thresholds.memory_usage_mb * 2**20),
        )
        chain = cache
    rate_limit = None
    if config.security.rate_limit > 0:
        rate_limit = RateLimitBackend(
            chain, requests_per_hour=config.security.rate_limit, shared_with=rate_limit_shared_with
        )
        chain = rate_limit
    request_stats = RequestStatsBackend(chain)
    chain = request_stats
    if metrics is not None:
        chain = MetricsBackend(chain, router=name, metrics=metrics)
    return HostedRouterChain(
        name=name,
        hosted=hosted,
        executor=executor,
        chain=chain,
        request_stats=request_stats,
        batcher=batcher,
        cache=cache,
        breaker=breaker,
        rate_limit=rate_limit,
    )
