"""The seed's in-process door: the serving chain's stages wrapped around a router, no gRPC.

``create_cached_router`` and ``create_monitoring_wrapper`` run the very ``CacheBackend``,
``RequestStatsBackend``, ``CircuitBreakerBackend`` and ``MetricsBackend`` the server
chains use; only the innermost stage differs (:class:`RouterModuleBackend` calls the
module's forward in a worker thread). Their ``route`` is synchronous: the chain runs on a
private event loop in a daemon thread owned by the wrapper, so it works the same from
plain code, from other threads and from inside a running event loop (which it blocks for
the call). ``close()`` stops it. ``create_optimized_router`` lives in
:mod:`moe_router.doors.inprocess_optimized`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry

from moe_router.chain.alerts import AlertFigures, AlertMonitor, AlertThresholds
from moe_router.chain.backend import RouteCall, RouteOptions, RouteResult
from moe_router.chain.breaker import CircuitBreakerBackend
from moe_router.chain.cache import CacheBackend, process_rss_bytes
from moe_router.chain.figures import RouterFigures
from moe_router.chain.metrics import MetricsBackend, RouterMetrics
from moe_router.chain.request_stats import RequestStatsBackend
from moe_router.errors import RouterConfigurationError
from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput

__all__ = [
    "RouterModuleBackend",
    "CachedRouter",
    "MonitoredRouter",
    "create_cached_router",
    "create_monitoring_wrapper",
    "DEFAULT_ALERT_THRESHOLDS",
    "GRAD_ENABLED",
    "live_version",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CACHE_STATS_KEYS = ("size", "max_size", "hit_count", "miss_count", "hit_rate", "ttl_seconds")
_IN_PROCESS = "in-process"

#: The seed's config.yaml ``monitoring.alert_thresholds`` defaults, as a dict.
DEFAULT_ALERT_THRESHOLDS: dict[str, float] = dataclasses.asdict(AlertThresholds())

#: Autograd mode of the in-process caller, carried to the forward thread (off by default).
GRAD_ENABLED: ContextVar[bool] = ContextVar("moe_router_grad_enabled", default=False)


def live_version(router: torch.nn.Module) -> str:
    """A cheap version of a module's current weights: changes on any in-place update.

    Hashes each persistent tensor's storage address and autograd version counter (which
    ``copy_``, optimizer steps and ``load_state_dict`` bump), plus the training flag.
    Writes through ``.data`` bypass the counter: call ``clear_cache()`` after those.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"T" if router.training else b"E")
    for name, tensor in router.state_dict(keep_vars=True).items():
        digest.update(f"{name}:{tensor.data_ptr()}:{tensor._version};".encode())
    return digest.hexdigest()


class RouterModuleBackend:
    """The innermost in-process stage: ``router(hidden_states, ...)`` in a worker thread.

    Runs in the autograd mode :data:`GRAD_ENABLED` holds for the call (off unless an
    in-process door turns it on), seeds a generator on the input's device when the call
    has ``options.seed``, and passes ``options.extra_inputs`` as keyword tensors.
    """

    def __init__(self, router: RouterBase) -> None:
        self.router = router
        self._calls = 0

    async def route(self, call: RouteCall) -> RouteResult:
        """Forward the call's hidden states through the router off the event loop."""
        self._calls += 1
        started = time.perf_counter()
        output = await asyncio.to_thread(self._forward, call, GRAD_ENABLED.get())
        return RouteResult(
            output=output,
            router_version=live_version(self.router),
            batch_tokens=call.num_tokens,
            compute_time_us=int((time.perf_counter() - started) * 1e6),
        )

    def stats(self) -> int:
        """Forward calls made so far."""
        return self._calls

    def _forward(self, call: RouteCall, grad_enabled: bool) -> RouterOutput:
        generator = None
        if call.options.seed is not None:
            generator = torch.Generator(device=call.hidden_states.device)
            generator.manual_seed(call.options.seed)
        with torch.set_grad_enabled(grad_enabled):
            return self.router(call.hidden_states, generator=generator,
                               **call.options.extra_inputs)


class _LoopThread:
    """A private event loop running in a daemon thread; sync code runs coroutines on it."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("an in-process router cannot be called from its own loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _ChainDoor:
    """Shared sync door of the chain-based wrappers: build a RouteCall, run it, copy out."""

    def __init__(self, router: RouterBase, name: str) -> None:
        if not isinstance(router, RouterBase):
            raise RouterConfigurationError(
                f"router: must be a moe_router RouterBase, got {type(router).__name__}"
            )
        self.router = router
        self._module = RouterModuleBackend(router)
        self._loop = _LoopThread(name)
        self._chain: Any = self._module

    def route(
        self,
        hidden_states: torch.Tensor,
        return_router_logits: bool = False,
        seed: int | None = None,
        skip_cache: bool = False,
        **extra_inputs: torch.Tensor,
    ) -> RouterOutput:
        """Route hidden states [T, D] or [B, S, D]; the answer keeps the leading dims.

        ``extra_inputs`` are the estimator tensors (``attention_weights``, ``logits``,
        ``gradients``); ``seed`` makes a noisy router reproducible.
        """
        call = RouteCall(
            router=_IN_PROCESS,
            layer=0,
            hidden_states=hidden_states,
            options=RouteOptions(return_router_logits=return_router_logits,
                                 skip_cache=skip_cache, seed=seed, extra_inputs=extra_inputs),
        )
        # The loop task copies this thread's context, so the forward sees the flag.
        token = GRAD_ENABLED.set(self._grad_enabled())
        try:
            return self._answer(self._loop.run(self._chain.route(call)))
        finally:
            GRAD_ENABLED.reset(token)

    __call__ = route

    def close(self) -> None:
        """Stop the wrapper's event loop thread."""
        self._loop.close()

    def _grad_enabled(self) -> bool:
        return torch.is_grad_enabled()

    def _answer(self, result: RouteResult) -> RouterOutput:
        return result.output


class CachedRouter(_ChainDoor):
    """A router behind the response cache (seed: ``create_cached_router``).

    Runs without autograd (cached answers carry no graph) and returns a private copy of
    every answer, so changing it in place never changes what the cache holds.
    """

    def __init__(self, router: RouterBase, cache_size: int = 1000, adaptive: bool = True,
                 ttl_seconds: float = 300.0, max_bytes: int = 256 * 2**20) -> None:
        super().__init__(router, "moe-router-cached")
        self.cache = CacheBackend(
            self._module,
            router_version=lambda layer: live_version(router),
            stateful=router.stateful,
            stochastic=lambda call: router.stochastic,
            cache_size=cache_size,
            max_bytes=max_bytes,
            ttl_seconds=ttl_seconds,
            adaptive=adaptive,
        )
        self._chain = self.cache

    def get_cache_stats(self) -> dict[str, Any]:
        """size, max_size, hit_count, miss_count, hit_rate, ttl_seconds (as the seed lists)."""
        stats = dataclasses.asdict(self.cache.stats())
        return {key: stats[key] for key in _CACHE_STATS_KEYS}

    def clear_cache(self) -> None:
        """Drop every cached answer (hit and miss counts are kept)."""
        self.cache.clear()

    def _grad_enabled(self) -> bool:
        return False

    def _answer(self, result: RouteResult) -> RouterOutput:
        return _private_copy(result.output)


class MonitoredRouter(_ChainDoor):
    """A router behind the metrics and request-statistics stages and, optionally, a breaker.

    Figures come from the same stages as a served router's (``RequestStatsBackend``
    for calls, latency and expert load; the metrics stage's private registry,
    ``self.registry``, for calls by status code). Health compares the four alert figures
    with the thresholds exactly as the server does (:class:`AlertFigures`): mean recent
    latency, failures of our own over the last minute (a caller's bad input is not a
    failure), variance of the experts' load shares, process RSS. A check fails when its
    value exceeds its threshold; with no value yet it passes.
    """

    def __init__(self, router: RouterBase, enable_circuit_breaker: bool = True, *,
                 alert_thresholds: dict[str, float] | None = None, name: str = "router",
                 **breaker_kwargs: Any) -> None:
        thresholds = _thresholds(alert_thresholds or {})
        super().__init__(router, "moe-router-monitored")
        self.name = name
        self.thresholds = thresholds
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.breaker = None
        chain: Any = self._module
        if enable_circuit_breaker:
            on_change = breaker_kwargs.pop("on_state_change", None)

            def state_changed(breaker_name: str, old: str, new: str) -> None:
                self.metrics.breaker_transition(breaker_name, old, new)
                if on_change is not None:
                    on_change(breaker_name, old, new)

            self.breaker = CircuitBreakerBackend(chain, name=name, on_state_change=state_changed,
                                                 **breaker_kwargs)
            chain = self.breaker
        self.requests = RequestStatsBackend(chain, layers=1, experts=router.num_experts)
        self._chain = MetricsBackend(self.requests, router=name, metrics=self.metrics)
        self.metrics.watch(name, self.figures)
        self._alerts = AlertMonitor(thresholds)

    def figures(self) -> RouterFigures:
        """The wrapper's stages' figures now."""
        return RouterFigures(
            router=self.name,
            requests=self.requests.stats(),
            breaker=None if self.breaker is None else self.breaker.stats(),
        )

    def get_monitoring_summary(self) -> dict[str, Any]:
        """``performance``, ``health`` (check -> ok/value/threshold), ``circuit_breaker_state``."""
        requests = self.requests.stats()
        alert_figures = AlertFigures.of(requests, process_rss_bytes())
        checks = self._alerts.update(self.name, alert_figures)
        health = {name: {"ok": c.ok, "value": c.value, "threshold": c.threshold}
                  for name, c in checks.items()}
        state = "DISABLED" if self.breaker is None else self.breaker.state.value
        performance = {
            "total_calls": requests.requests,
            "successful_calls": requests.requests - requests.errors,
            "failed_calls": requests.errors,
            "calls_by_code": self._calls_by_code(),
            "avg_latency_ms": alert_figures.avg_latency_ms,
            "error_rate": alert_figures.error_rate,
            "tokens_routed": requests.tokens,
            "tokens_per_expert": list(requests.tokens_per_expert) if requests.tokens else None,
            "load_balance_score": requests.load_balance_score if requests.tokens else None,
            "load_balance_variance": alert_figures.load_balance_variance,
            "memory_usage_mb": alert_figures.memory_usage_mb,
        }
        return {"performance": performance, "health": health, "circuit_breaker_state": state}

    def _calls_by_code(self) -> dict[str, int]:
        """Calls by gRPC status code, as the metrics stage counted them."""
        by_code: dict[str, int] = {}
        for family in self.registry.collect():
            if family.name == "moe_router_requests":
                for sample in family.samples:
                    if sample.name.endswith("_total") and sample.labels["router"] == self.name:
                        by_code[sample.labels["code"]] = int(sample.value)
        return dict(sorted(by_code.items()))


def _thresholds(given: dict[str, float]) -> AlertThresholds:
    """The seed's ``alert_thresholds`` dict over the defaults, checked key by key."""
    allowed = [f.name for f in dataclasses.fields(AlertThresholds)]
    for key, value in given.items():
        if key not in allowed:
            raise RouterConfigurationError(
                f"alert_thresholds: unknown key {key!r}; allowed: {', '.join(allowed)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RouterConfigurationError(
                f"alert_thresholds.{key}: must be a number >= 0, got {value!r}"
            )
    return AlertThresholds(**{key: float(value) for key, value in given.items()})


def create_cached_router(router: RouterBase, cache_size: int = 1000,
                         adaptive: bool = True) -> CachedRouter:
    """Wrap ``router`` in the response cache (LRU + TTL, adaptive size when asked)."""
    return CachedRouter(router, cache_size=cache_size, adaptive=adaptive)


def create_monitoring_wrapper(router: RouterBase, enable_circuit_breaker: bool = True,
                              **monitor_kwargs: Any) -> MonitoredRouter:
    """Wrap ``router`` in metrics and a circuit breaker.

    monitor_kwargs: ``alert_thresholds`` (avg_latency_ms, error_rate,
    load_balance_variance, memory_usage_mb), ``name``, and any CircuitBreakerBackend
    keyword (sliding_window_size, failure_rate_threshold, wait_duration_s, clock, ...).
    """
    allowed = {"alert_thresholds", "name"} | {
        p for p in inspect.signature(CircuitBreakerBackend).parameters
        if p not in ("inner", "name")
    }
    unknown = sorted(set(monitor_kwargs) - allowed)
    if unknown:
        raise RouterConfigurationError(
            f"monitor_kwargs: unknown {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return MonitoredRouter(router, enable_circuit_breaker, **monitor_kwargs)


def _private_copy(output: RouterOutput) -> RouterOutput:
    """The same answer with every tensor cloned (and ``info`` copied)."""
    changes: dict[str, Any] = {"info": dict(output.info)}
    for field in dataclasses.fields(output):
        value = getattr(output, field.name)
        if isinstance(value, torch.Tensor):
            changes[field.name] = value.clone()
    return dataclasses.replace(output, **changes)


