"""Serving stages that wrap a Backend in a Backend: metrics, rate limit, cache, breaker.

Chain, outermost first: MetricsBackend -> RateLimitBackend -> CacheBackend ->
CircuitBreakerBackend -> (batcher, device executor).
"""

from moe_router.middleware.breaker import BreakerState, CircuitBreakerBackend
from moe_router.middleware.cache import CacheBackend
from moe_router.middleware.metrics import MetricsBackend, RouterMetrics, start_metrics_http_server
from moe_router.middleware.ratelimit import RateLimitBackend

__all__ = [
    "BreakerState",
    "CacheBackend",
    "CircuitBreakerBackend",
    "MetricsBackend",
    "RateLimitBackend",
    "RouterMetrics",
    "start_metrics_http_server",
]
