"""RouterFigures: every stage's figures of one router, read together.

Each stage keeps its own figures and reports them as a frozen dataclass; this is the
bundle Stats, the metrics collectors and the alerts read, so each figure has one home.
A stage switched off in config.yaml has no figures (None).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_router.chain.batcher import BatcherFigures
from moe_router.chain.breaker import BreakerFigures
from moe_router.chain.cache import CacheFigures
from moe_router.chain.device import DeviceFigures
from moe_router.chain.ratelimit import RateLimitFigures
from moe_router.chain.request_stats import RequestFigures

__all__ = ["RouterFigures"]


@dataclass(frozen=True)
class RouterFigures:
    """One router's figures, stage by stage."""

    router: str
    requests: RequestFigures
    device: DeviceFigures | None = None
    batcher: BatcherFigures | None = None
    cache: CacheFigures | None = None
    breaker: BreakerFigures | None = None
    rate_limit: RateLimitFigures | None = None
