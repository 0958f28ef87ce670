"""The seed's in-process wrappers: the serving stages wrapped around a router, without gRPC.

``create_cached_router`` and ``create_monitoring_wrapper`` run the very ``CacheBackend``,
``CircuitBreakerBackend`` and ``MetricsBackend`` the server chains use; only the innermost
stage differs (:class:`RouterModuleBackend` calls the module's forward in a worker
thread). Their ``route`` is synchronous: the chain runs on a private event loop in a daemon
thread owned by the wrapper, so it works the same from plain code, from other threads and
from inside a running event loop (which it blocks for the call). ``close()`` stops it.

``create_optimized_router`` runs calls on an :class:`AutoscalingThreadPool` and, for
per-token routers, splits large batches across its workers; the answer is identical to
one call of the router.
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

from moe_router.chain.alerts import DEFAULT_ALERT_THRESHOLDS, AlertMonitor
from moe_router.chain.backend import RouteCall, RouteOptions, RouteResult
from moe_router.errors import RouterConfigurationError
from moe_router.chain.pool import AutoscalingThreadPool
from moe_router.chain.breaker import CircuitBreakerBackend
from moe_router.chain.cache import CacheBackend, process_rss_bytes
from moe_router.chain.metrics import MetricsBackend, RouterMetrics
from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput

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

log = logging.getLogger(__name__)
T = TypeVar("T")

_CACHE_STATS_KEYS = ("size", "max_size", "hit_count", "miss_count", "hit_rate", "ttl_seconds")
_IN_PROCESS = "in-process"

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

    def stats(self) -> dict[str, Any]:
        """Forward calls made so far."""
        return {"forward_calls": self._calls}

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
        stats = self.cache.cache_stats()
        return {key: stats[key] for key in _CACHE_STATS_KEYS}

    def clear_cache(self) -> None:
        """Drop every cached answer (hit and miss counts are kept)."""
        self.cache.clear()

    def _grad_enabled(self) -> bool:
        return False

    def _answer(self, result: RouteResult) -> RouterOutput:
        return _private_copy(result.output)


class MonitoredRouter(_ChainDoor):
    """A router behind the metrics stage and, optionally, a circuit breaker.

    Figures are the Prometheus families of a private registry (``self.registry``), read
    back by :meth:`get_monitoring_summary`. Health checks compare four figures with the
    alert thresholds: ``avg_latency_ms`` (mean latency of every call), ``error_rate``
    (failed / all calls), ``load_balance_variance`` (population variance over experts of
    the share of routed tokens each expert received, ``tokens_e / tokens``) and
    ``memory_usage_mb`` (process RSS). A check fails when its value exceeds its threshold;
    with no calls yet its value is None and it passes.
    """

    def __init__(self, router: RouterBase, enable_circuit_breaker: bool = True, *,
                 alert_thresholds: dict[str, float] | None = None, name: str = "router",
                 **breaker_kwargs: Any) -> None:
        thresholds = dict(DEFAULT_ALERT_THRESHOLDS)
        for key, value in (alert_thresholds or {}).items():
            if key not in DEFAULT_ALERT_THRESHOLDS:
                raise RouterConfigurationError(
                    f"alert_thresholds: unknown key {key!r}; allowed: "
                    f"{', '.join(DEFAULT_ALERT_THRESHOLDS)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise RouterConfigurationError(
                    f"alert_thresholds.{key}: must be a number >= 0, got {value!r}"
                )
            thresholds[key] = float(value)
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
        self._chain = MetricsBackend(chain, router=name, metrics=self.metrics)
        self._alerts = AlertMonitor(thresholds)

    def get_monitoring_summary(self) -> dict[str, Any]:
        """``performance``, ``health`` (check -> ok/value/threshold), ``circuit_breaker_state``."""
        performance = self._performance()
        health = self._alerts.update(self.name, performance)
        state = "DISABLED" if self.breaker is None else self.breaker.state.value
        return {"performance": performance, "health": health, "circuit_breaker_state": state}

    def _performance(self) -> dict[str, Any]:
        value = self.registry.get_sample_value
        labels = {"router": self.name}
        by_code: dict[str, float] = {}
        for family in self.registry.collect():
            if family.name == "moe_router_requests":
                for sample in family.samples:
                    if sample.name.endswith("_total") and sample.labels["router"] == self.name:
                        by_code[sample.labels["code"]] = sample.value
        total = int(sum(by_code.values()))
        failed = total - int(by_code.get("OK", 0))
        count = value("moe_router_request_duration_seconds_count", labels) or 0.0
        seconds = value("moe_router_request_duration_seconds_sum", labels) or 0.0
        tokens = int(value("moe_router_tokens_routed_total", labels) or 0)
        load = self.metrics.load.expert_load(self.name)
        variance = None
        if tokens and load is not None:
            variance = float((load.double() / tokens).var(unbiased=False))
        return {
            "total_calls": total,
            "successful_calls": total - failed,
            "failed_calls": failed,
            "calls_by_code": {code: int(n) for code, n in sorted(by_code.items())},
            "avg_latency_ms": seconds / count * 1e3 if count else None,
            "error_rate": failed / total if total else None,
            "tokens_routed": tokens,
            "tokens_per_expert": None if load is None else load.tolist(),
            "load_balance_score": value("moe_router_load_balance_score", labels),
            "load_balance_variance": variance,
            "memory_usage_mb": process_rss_bytes() / 2**20,
        }


class OptimizedRouter:
    """A router run on an autoscaling worker pool, splitting large per-token batches.

    A batch is split when ``enable_parallel`` is on, it has at least
    ``2 * min_tokens_per_split`` tokens and carries no extra inputs, and the router is
    per-token, deterministic and stateless (not ``couples_tokens_now``, ``stochastic`` or
    ``stateful``). The chunks run on the pool; their per-token tensors are concatenated
    (bit-identical, the gate matmul being batch-invariant), per-expert counts summed, and
    the batch losses recomputed over the whole batch with the router's own
    ``select``/``compute_aux_loss``/``compute_z_loss``, so the answer equals one call's.
    (The router's running statistics count each chunk as a batch.) ``route`` blocks its
    caller; do not call it from the pool's own workers.
    """

    def __init__(self, router: RouterBase, enable_autoscaling: bool = True,
                 enable_parallel: bool = True, max_workers: int = 4, *, min_workers: int = 1,
                 idle_timeout_s: float = 5.0, min_tokens_per_split: int = 2048) -> None:
        if not isinstance(router, RouterBase):
            raise RouterConfigurationError(
                f"router: must be a moe_router RouterBase, got {type(router).__name__}"
            )
        if isinstance(min_tokens_per_split, bool) or not isinstance(min_tokens_per_split, int) \
                or min_tokens_per_split < 1:
            raise RouterConfigurationError(
                f"min_tokens_per_split: must be a positive integer, got {min_tokens_per_split!r}"
            )
        self.router = router
        self.enable_parallel = enable_parallel
        self.min_tokens_per_split = min_tokens_per_split
        self.pool = AutoscalingThreadPool(
            max_workers=max_workers, min_workers=min(min_workers, max_workers),
            autoscale=enable_autoscaling, idle_timeout_s=idle_timeout_s,
            name="moe-router-optimized",
        )
        self._lock = threading.Lock()
        self._calls = self._failed = self._split_calls = self._tokens = 0
        self._busy_s = 0.0

    def route(self, hidden_states: torch.Tensor, seed: int | None = None,
              **extra_inputs: torch.Tensor) -> RouterOutput:
        """Route hidden states [T, D] or [B, S, D] on the pool (split when worthwhile)."""
        started = time.perf_counter()
        grad = torch.is_grad_enabled()
        try:
            chunks = self._chunks(hidden_states, seed, extra_inputs)
            if chunks is None:
                output = self.pool.submit(self._forward, hidden_states, seed, grad,
                                          extra_inputs).result()
            else:
                futures = [self.pool.submit(self._forward, c, None, grad, {}) for c in chunks]
                output = self._merge(hidden_states, [f.result() for f in futures], grad)
        except BaseException:
            with self._lock:
                self._calls += 1
                self._failed += 1
            raise
        with self._lock:
            self._calls += 1
            self._split_calls += chunks is not None
            self._tokens += int(hidden_states.numel() // max(hidden_states.shape[-1], 1))
            self._busy_s += time.perf_counter() - started
        return output

    __call__ = route

    def get_optimization_stats(self) -> dict[str, Any]:
        """``performance`` (calls, tokens, latency), ``autoscaler`` (pool), ``memory_pool``."""
        with self._lock:
            done = self._calls - self._failed
            performance = {
                "total_calls": self._calls,
                "failed_calls": self._failed,
                "split_calls": self._split_calls,
                "tokens_routed": self._tokens,
                "avg_latency_ms": self._busy_s / done * 1e3 if done else None,
                "tokens_per_second": self._tokens / self._busy_s if self._busy_s else None,
                "parallel_enabled": self.enable_parallel,
            }
        return {"performance": performance, "autoscaler": self.pool.stats(),
                "memory_pool": _memory_pool_stats(self.router)}

    def close(self) -> None:
        """Stop the worker pool."""
        self.pool.shutdown(wait=True)

    def _chunks(self, hidden_states: torch.Tensor, seed: int | None,
                extra_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        router = self.router
        if (not self.enable_parallel or extra_inputs or seed is not None
                or router.couples_tokens_now or router.stochastic or router.stateful
                or hidden_states.dim() not in (2, 3)):
            return None
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        pieces = min(self.pool.stats()["max_workers"], flat.shape[0] // self.min_tokens_per_split)
        if pieces < 2:
            return None
        return list(flat.tensor_split(pieces))

    def _forward(self, hidden_states: torch.Tensor, seed: int | None, grad: bool,
                 extra_inputs: dict[str, torch.Tensor]) -> RouterOutput:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=hidden_states.device).manual_seed(seed)
        with torch.set_grad_enabled(grad):
            return self.router(hidden_states, generator=generator, **extra_inputs)

    def _merge(self, hidden_states: torch.Tensor, parts: list[RouterOutput],
               grad: bool) -> RouterOutput:
        """One call's answer from the answers of its token chunks (see class docstring)."""
        lead = tuple(hidden_states.shape[:-1])
        k_max = max(p.k_max for p in parts)
        indices = torch.cat([_pad(p.expert_indices, k_max, -1) for p in parts])
        weights = torch.cat([_pad(p.expert_weights, k_max, 0.0) for p in parts])
        logits = torch.cat([p.router_logits for p in parts])
        flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        with torch.set_grad_enabled(grad):
            selection = self.router.select(logits, flat_hidden, lead_shape=lead)
            aux_loss = self.router.compute_aux_loss(selection.probs, indices)
            z_loss = self.router.compute_z_loss(logits)
        scores = [p.complexity_scores for p in parts if p.complexity_scores is not None]
        return dataclasses.replace(
            parts[0],
            expert_indices=indices.reshape(*lead, k_max),
            expert_weights=weights.reshape(*lead, k_max),
            num_experts_per_token=torch.cat([p.num_experts_per_token for p in parts]).reshape(lead),
            router_logits=logits.reshape(*lead, -1),
            tokens_per_expert=torch.stack([p.tokens_per_expert for p in parts]).sum(0),
            dropped_tokens=sum(p.dropped_tokens for p in parts),
            aux_loss=aux_loss,
            z_loss=z_loss,
            complexity_scores=torch.cat(scores).reshape(lead) if scores else None,
        )


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


def create_optimized_router(router: RouterBase, enable_autoscaling: bool = True,
                            enable_parallel: bool = True, max_workers: int = 4,
                            **scaling_kwargs: Any) -> OptimizedRouter:
    """Run ``router`` on an autoscaling pool of up to ``max_workers`` threads.

    scaling_kwargs: ``min_workers`` (1), ``idle_timeout_s`` (5.0), ``min_tokens_per_split``
    (2048).
    """
    allowed = ("min_workers", "idle_timeout_s", "min_tokens_per_split")
    unknown = sorted(set(scaling_kwargs) - set(allowed))
    if unknown:
        raise RouterConfigurationError(
            f"scaling_kwargs: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return OptimizedRouter(router, enable_autoscaling, enable_parallel, max_workers,
                           **scaling_kwargs)


def _pad(tensor: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """Right-pad the last dim of [T, k] to ``width`` with ``fill``."""
    missing = width - tensor.shape[-1]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, missing), value=fill)


def _private_copy(output: RouterOutput) -> RouterOutput:
    """The same answer with every tensor cloned (and ``info`` copied)."""
    changes: dict[str, Any] = {"info": dict(output.info)}
    for field in dataclasses.fields(output):
        value = getattr(output, field.name)
        if isinstance(value, torch.Tensor):
            changes[field.name] = value.clone()
    return dataclasses.replace(output, **changes)


def _memory_pool_stats(router: RouterBase) -> dict[str, Any]:
    """The device allocator's pool (CUDA caching allocator) and the process RSS."""
    device = next(router.parameters()).device
    stats: dict[str, Any] = {"device": str(device), "rss_bytes": process_rss_bytes()}
    if device.type == "cuda":
        stats.update(
            allocated_bytes=torch.cuda.memory_allocated(device),
            reserved_bytes=torch.cuda.memory_reserved(device),
            peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
        )
    return stats
