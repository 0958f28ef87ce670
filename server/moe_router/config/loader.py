"""Service configuration: config.yaml + environment + overrides -> frozen, validated dataclasses.

Sources, lowest precedence first (``PRECEDENCE``, the one place it is declared): the
dataclass defaults, the YAML file (the embedded default when no path is given), the
environment (``DYNAMIC_MOE_*``, declared on each field with ``env=``), then explicit
overrides (CLI arguments, dotted keys such as ``{"server.port": 0}``). Only this package
reads the environment: this module for the config, :mod:`moe_router.config.environment`
for what launchers need (a test fails on a read anywhere else).

Every problem raises :class:`RouterConfigurationError` naming where the value came
from (the file, ``environment variable X`` or ``overrides``) and its key path, e.g.
``config.yaml: routers[2].top_k: must be <= num_experts (8), got 12``.

Compatibility with the seed's config.yaml:
- ``optimization.enable_caching``, ``optimization.max_workers``, ``optimization.cache_size``
  and ``monitoring.enable_circuit_breaker`` are aliases (``ALIASES``) of
  ``cache.enabled``, ``server.max_workers``, ``cache.cache_size`` and ``breaker.enabled``;
  the typed config mirrors the target's value, and a source that sets both an alias and
  its target to different values is rejected.
- A top-level ``router:`` block (input_dim, num_experts, min_experts, ...) is shorthand for
  ``routers: [{name: default, kind: dynamic, ...}]`` with random weights.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_router.config.router_entries import build_routers, router_error
from moe_router.config.schema import (
    ALIASES,
    AlertThresholds,
    BatchingConfig,
    BenchmarkingConfig,
    BreakerConfig,
    CacheConfig,
    CoLocatedConfig,
    ExpertGranularity,
    FaultSpec,
    HealthConfig,
    LogLevel,
    MetricsConfig,
    MonitoringConfig,
    OptimizationConfig,
    RouterKind,
    RouterSpec,
    SecurityConfig,
    ServerConfig,
    ServiceConfig,
    TestingConfig,
    TLSConfig,
    WeightsInit,
    WeightsSpec,
)
from moe_router.config.sources import (
    Context,
    Layer,
    Origin,
    default_config_text,
    env_fields,
    env_layer,
    file_layer,
    merge_into,
    override_layer,
    settable,
)
from moe_router.config.typed_values import build
from moe_router.errors import RouterConfigurationError
from moe_router.routing.dynamic import RoutingStrategy
from moe_router.routing.zeta import Mechanism

__all__ = [
    "PRECEDENCE",
    "CONFIG_PATH_ENV",
    "ALIASES",
    "load_config",
    "default_config_text",
    "env_variables",
    "router_error",
    "ServiceConfig",
    "ServerConfig",
    "MetricsConfig",
    "HealthConfig",
    "BatchingConfig",
    "CacheConfig",
    "BreakerConfig",
    "AlertThresholds",
    "MonitoringConfig",
    "SecurityConfig",
    "CoLocatedConfig",
    "TLSConfig",
    "OptimizationConfig",
    "BenchmarkingConfig",
    "TestingConfig",
    "RouterSpec",
    "WeightsSpec",
    "FaultSpec",
    "RouterKind",
    "RoutingStrategy",
    "Mechanism",
    "WeightsInit",
    "ExpertGranularity",
    "LogLevel",
]

PRECEDENCE = ("defaults", "file", "environment", "overrides")
"""Configuration sources, lowest precedence first: each overrides the ones before it."""

CONFIG_PATH_ENV = "DYNAMIC_MOE_CONFIG"
"""Environment variable naming the config file when ``load_config`` gets no path."""

_ENV_PREFIX = "DYNAMIC_MOE_"


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServiceConfig:
    """Read, merge (``PRECEDENCE``) and validate the configuration.

    path: a config.yaml; None reads ``$DYNAMIC_MOE_CONFIG`` when set, else the embedded
    default (the repository's config.yaml). env: the environment (``os.environ`` when
    None). overrides: dotted keys, e.g. ``{"server.port": 0, "server.device": "cpu"}``;
    string values of typed keys are parsed like environment values.
    Raises RouterConfigurationError naming the source and the key path.
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_PATH_ENV, "").strip():
        path = env[CONFIG_PATH_ENV].strip()
    from_file = file_layer(path)
    layers = {
        "defaults": Layer("defaults", {}, from_file.base_dir),
        "file": from_file,
        "environment": env_layer(env),
        "overrides": override_layer(overrides or {}),
    }
    merged: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for name in PRECEDENCE:
        merge_into(merged, layers[name].tree, "", layers[name], origins)
    ctx = Context(origins, from_file, env)
    config = _build_service(merged, ctx)
    _check_env_names(env, config.security.api_keys_env)
    return config


def env_variables() -> dict[str, str]:
    """Every ``DYNAMIC_MOE_*`` variable the config reads -> the dotted key it sets."""
    return {var: dotted for var, (dotted, _) in env_fields().items()}


# --------------------------------------------------------------------------- validation
def _build_service(merged: Mapping[str, Any], ctx: Context) -> ServiceConfig:
    for key in merged:
        if key not in settable(ServiceConfig):
            ctx.unknown(str(key), key, settable(ServiceConfig) | {"router"})
    server = build(ServerConfig, merged.get("server"), "server", ctx)
    _check_server(server, ctx)
    cache_ = build(CacheConfig, merged.get("cache"), "cache", ctx)
    breaker = build(BreakerConfig, merged.get("breaker"), "breaker", ctx)
    _check_breaker(breaker, ctx)
    batching = build(BatchingConfig, merged.get("batching"), "batching", ctx)
    testing = build(TestingConfig, merged.get("testing"), "testing", ctx)
    config = ServiceConfig(
        server=server,
        metrics=build(MetricsConfig, merged.get("metrics"), "metrics", ctx),
        health=build(HealthConfig, merged.get("health"), "health", ctx),
        batching=batching,
        cache=cache_,
        breaker=breaker,
        monitoring=replace(
            build(MonitoringConfig, merged.get("monitoring"), "monitoring", ctx),
            enable_circuit_breaker=breaker.enabled,
        ),
        security=_build_security(merged.get("security"), ctx),
        colocated=build(CoLocatedConfig, merged.get("colocated"), "colocated", ctx),
        optimization=replace(
            build(OptimizationConfig, merged.get("optimization"), "optimization", ctx),
            enable_caching=cache_.enabled,
            max_workers=server.max_workers,
            cache_size=cache_.cache_size,
        ),
        benchmarking=build(BenchmarkingConfig, merged.get("benchmarking"), "benchmarking", ctx),
        testing=testing,
        routers=build_routers(merged.get("routers"), ctx, batching, testing),
        source=ctx.file_label,
    )
    _check_ports(config, ctx)
    return config


def _check_server(server: ServerConfig, ctx: Context) -> None:
    if server.max_concurrent_rpcs <= server.max_in_flight_calls:
        ctx.fail(
            "server.max_concurrent_rpcs",
            f"must be > server.max_in_flight_calls ({server.max_in_flight_calls}), got "
            f"{server.max_concurrent_rpcs}; otherwise gRPC refuses overload with its own "
            "bare 'Concurrent RPC limit exceeded!' before the server can say when to retry",
        )
    if server.event_loop_cpu is not None and server.intra_op_threads != 1:
        ctx.fail(
            "server.event_loop_cpu",
            f"needs server.intra_op_threads 1, got {server.intra_op_threads}; torch's "
            "worker threads started from the pinned event loop would all share its CPU",
        )


def _check_breaker(breaker: BreakerConfig, ctx: Context) -> None:
    if breaker.minimum_number_of_calls > breaker.sliding_window_size:
        ctx.fail(
            "breaker.minimum_number_of_calls",
            f"must be <= breaker.sliding_window_size ({breaker.sliding_window_size}), got "
            f"{breaker.minimum_number_of_calls}; the breaker could never open",
        )
    if breaker.max_wait_duration_s < breaker.wait_duration_s:
        ctx.fail(
            "breaker.max_wait_duration_s",
            f"must be >= breaker.wait_duration_s ({breaker.wait_duration_s}), got "
            f"{breaker.max_wait_duration_s}",
        )


def _check_ports(config: ServiceConfig, ctx: Context) -> None:
    taken = {"server.port": config.server.port}
    for section in ("metrics", "health"):
        endpoint = getattr(config, section)
        if not endpoint.enabled or endpoint.port == 0:
            continue
        for other, port in taken.items():
            if port == endpoint.port:
                ctx.fail(f"{section}.port", f"{port} is also {other}; give each endpoint its own "
                         "port (or 0 for a free one)")
        taken[f"{section}.port"] = endpoint.port


def _build_security(raw: Any, ctx: Context) -> SecurityConfig:
    security = build(SecurityConfig, raw, "security", ctx)
    keys: list[str] = []
    if security.api_keys_file is not None:
        if not security.api_keys_file.is_file():
            ctx.fail("security.api_keys_file", f"file not found: {security.api_keys_file}; "
                     "create it (one key per line, '#' comments) or remove the key")
        lines = security.api_keys_file.read_text("utf-8").splitlines()
        keys += [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    keys += [k.strip() for k in ctx.env.get(security.api_keys_env, "").split(",") if k.strip()]
    if security.api_key_required and not keys:
        ctx.fail("security.api_key_required", "is true but no API key is configured; list keys "
                 f"in security.api_keys_file or set {security.api_keys_env}=key1,key2")
    tls = security.tls
    if tls.enabled:
        for name in ("cert_file", "key_file"):
            if getattr(tls, name) is None:
                ctx.fail("security.tls.enabled", f"is true but security.tls.{name} is not set; "
                         "set it to a PEM file or turn TLS off")
    elif tls.client_ca_file is not None:
        ctx.fail("security.tls.client_ca_file", "needs security.tls.enabled: true (mutual TLS "
                 "runs over TLS)")
    for name in ("cert_file", "key_file", "client_ca_file"):
        file = getattr(tls, name)
        if file is not None and not file.is_file():
            ctx.fail(f"security.tls.{name}", f"file not found: {file}")
    return replace(security, api_keys=tuple(dict.fromkeys(keys)))


def _check_env_names(env: Mapping[str, str], api_keys_env: str) -> None:
    """A ``DYNAMIC_MOE_*`` variable the config does not read is a typo; say which."""
    known = set(env_fields()) | {CONFIG_PATH_ENV, api_keys_env, "DYNAMIC_MOE_API_KEYS"}
    for var in env:
        if var.startswith(_ENV_PREFIX) and var not in known:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
            raise RouterConfigurationError(f"environment variable {var}: unknown; {hint}")
