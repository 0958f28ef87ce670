"""One hosted router: its loaded layers, its backend chain, and its figures.

:func:`build_chain` wraps a loaded router in the stages config.yaml switches on (see
:mod:`moe_router.chain` for the order); stages switched off are simply not in the chain.
The doors call ``chain`` and read :meth:`HostedRouterChain.figures`; how the figures
are encoded (Stats, ListRouters, Prometheus) is each door's business.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from moe_router.chain.alerts import AlertFigures
from moe_router.chain.backend import Backend
from moe_router.chain.batcher import Batcher
from moe_router.chain.breaker import CircuitBreakerBackend
from moe_router.chain.cache import CacheBackend, process_rss_bytes
from moe_router.chain.device import DeviceExecutor
from moe_router.chain.figures import RouterFigures
from moe_router.chain.metrics import MetricsBackend, RouterMetrics
from moe_router.chain.ratelimit import RateLimitBackend
from moe_router.chain.request_stats import RequestStatsBackend
from moe_router.config import ServiceConfig
from moe_router.loading.registry import HostedRouter

__all__ = ["HostedRouterChain", "build_chain"]


@dataclass
class HostedRouterChain:
    """A router as the doors see it: the outermost Backend plus its named stages."""

    name: str
    hosted: HostedRouter
    executor: DeviceExecutor
    chain: Backend
    request_stats: RequestStatsBackend
    batcher: Batcher | None = None
    cache: CacheBackend | None = None
    breaker: CircuitBreakerBackend | None = None
    rate_limit: RateLimitBackend | None = None

    @property
    def batches_across_requests(self) -> bool:
        """Whether concurrent calls of this router may share a device pass."""
        return self.batcher is not None and self.executor.merges_calls

    def figures(self) -> RouterFigures:
        """Every stage's figures now."""
        return RouterFigures(
            router=self.name,
            requests=self.request_stats.stats(),
            device=self.executor.stats(),
            batcher=None if self.batcher is None else self.batcher.stats(),
            cache=None if self.cache is None else self.cache.stats(),
            breaker=None if self.breaker is None else self.breaker.stats(),
            rate_limit=None if self.rate_limit is None else self.rate_limit.stats(),
        )

    def alert_figures(self) -> AlertFigures:
        """The figures ``monitoring.alert_thresholds`` judge (None until traffic)."""
        return AlertFigures.of(self.request_stats.stats(), process_rss_bytes())


def build_chain(
    hosted: HostedRouter,
    config: ServiceConfig,
    pool: Executor,
    metrics: RouterMetrics | None,
    on_breaker_change: Callable[[str, str, str], None] | None = None,
    rate_limit_shared_with: RateLimitBackend | None = None,
    calls_reading: Callable[[], int] | None = None,
) -> HostedRouterChain:
    """Wrap one loaded router in the stages config.yaml switches on.

    ``rate_limit_shared_with``: another chain's limiter whose per-caller buckets this one
    shares (``security.rate_limit`` is per caller across all routers). ``calls_reading``:
    how many calls the doors are reading now, which the batcher waits for.
    """
    spec = hosted.spec
    name = spec.name
    # Merged passes are bit-identical to routing alone with one intra-op thread on a CPU
    # (see DeviceExecutor); create_server sets torch's threads from the same key.
    merge_calls = hosted.device.type != "cpu" or config.server.intra_op_threads == 1
    executor = DeviceExecutor(
        name, hosted.layers, hosted.versions, hosted.device, pool, merge_calls=merge_calls,
        inline_max_us=spec.batching.inline_max_us,
        on_losses=None if metrics is None else metrics.loss_observer(name),
    )
    first = hosted.layers[0]
    chain: Backend = executor
    batcher = None
    if spec.batching.enabled:
        batching = spec.batching
        batcher = Batcher(
            executor,
            max_batch_tokens=batching.max_batch_tokens,
            max_queue_delay_us=batching.max_queue_delay_us,
            max_queue_size=batching.max_queue_size,
            on_batch=None if metrics is None else metrics.batch_observer(name),
            calls_reading=calls_reading,
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
        cache = CacheBackend(
            chain,
            router_version=lambda layer: hosted.versions[layer],
            stateful=first.stateful,
            stochastic=first.stochastic,  # every layer has the same class and config
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
    request_stats = RequestStatsBackend(
        chain, layers=len(hosted.layers), experts=first.num_experts,
        load_window_s=config.metrics.load_window_s,
    )
    chain = request_stats
    if metrics is not None:
        chain = MetricsBackend(chain, router=name, metrics=metrics)
    hosted_chain = HostedRouterChain(
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
    if metrics is not None:
        metrics.watch(name, hosted_chain.figures)
    return hosted_chain
