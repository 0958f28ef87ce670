"""The seed's import path of the in-process wrappers; the door itself is
:mod:`moe_router.doors.inprocess` (cached, monitored) and
:mod:`moe_router.doors.inprocess_optimized` (optimized)."""

from moe_router.doors.inprocess import (
    DEFAULT_ALERT_THRESHOLDS,
    GRAD_ENABLED,
    CachedRouter,
    MonitoredRouter,
    RouterModuleBackend,
    create_cached_router,
    create_monitoring_wrapper,
    live_version,
)
from moe_router.doors.inprocess_optimized import OptimizedRouter, create_optimized_router

__all__ = [
    "RouterModuleBackend",
    "CachedRouter",
    "MonitoredRouter",
    "OptimizedRouter",
    "create_cached_router",
    "create_monitoring_wrapper",
    "create_optimized_router",
    "DEFAULT_ALERT_THRESHOLDS",
    "GRAD_ENABLED",
    "live_version",
]
