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
import math
import os
import re
from collections.abc import Mapping
from dataclasses import is_dataclass, replace
from enum import Enum
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import torch

from moe_router.config.schema import (
    ALIASES,
    AlertThresholds,
    BatchingConfig,
    BenchmarkingConfig,
    BreakerConfig,
    CacheConfig,
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
    describe,
    env_fields,
    env_layer,
    file_layer,
    merge_into,
    override_layer,
    schema,
    settable,
    unwrap,
)
from moe_router.errors import RouterConfigurationError
from moe_router.routing.dynamic import RoutingStrategy
from moe_router.routing.kinds import kind_entry
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


def _convert(value: Any, hint: Any, path: str, ctx: Context, meta: Mapping[str, Any]) -> Any:
    """Check one value against its field type and bounds; return it typed."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return None if value is None else _convert(value, unwrap(hint), path, ctx, meta)
    if is_dataclass(hint):
        return _build(hint, value, path, ctx)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            ctx.fail(path, f"must be a list, got {describe(value)}")
        return tuple(
            _convert(item, get_args(hint)[0], f"{path}[{i}]", ctx, meta)
            for i, item in enumerate(value)
        )
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            ctx.fail(path, f"must be a mapping with string keys, got {describe(value)}")
        return MappingProxyType(dict(value))
    if origin is Literal:
        allowed = get_args(hint)
        match = [a for a in allowed if isinstance(value, str) and a.lower() == value.lower()]
        if not match:
            ctx.fail(path, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return match[0]
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in hint)
            ctx.fail(path, f"must be one of {choices}, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        ctx.fail(path, f"must be true or false, got {describe(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        ctx.fail(path, f"must be an integer, got {describe(value)}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ctx.fail(path, f"must be a number, got {describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            ctx.fail(path, f"must be finite, got {value}")
    if hint is str and not isinstance(value, str):
        ctx.fail(path, f"must be a string, got {describe(value)}")
    if hint is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            ctx.fail(path, f"must be a file path, got {describe(value)}")
        return ctx.resolve(path, str(value))
    _check_bounds(value, path, ctx, meta)
    return value


def _check_bounds(value: Any, path: str, ctx: Context, meta: Mapping[str, Any]) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        gt, lo, hi = meta.get("gt"), meta.get("lo"), meta.get("hi")
        if gt is not None and not value > gt:
            ctx.fail(path, f"must be > {gt}, got {value}")
        if lo is not None and value < lo:
            ctx.fail(path, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            ctx.fail(path, f"must be <= {hi}, got {value}")
    pattern = meta.get("pattern")
    if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
        ctx.fail(path, f"must be {meta['pattern_help']}, got {value!r}")


def _build_partial(cls: type, raw: Any, path: str, ctx: Context) -> dict[str, Any]:
    """The typed values of the keys ``raw`` sets (unknown keys are errors)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        ctx.fail(path, f"must be a mapping, got {describe(raw)}")
    fields_, allowed = schema(cls), settable(cls)
    values = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            if key in fields_:
                ctx.fail(sub, f"cannot be set: {fields_[key][0].metadata['doc']}")
            ctx.unknown(sub, key, allowed)
        f, hint = fields_[key]
        values[key] = _convert(value, hint, sub, ctx, f.metadata)
    return values


def _build(cls: type, raw: Any, path: str, ctx: Context) -> Any:
    return cls(**_build_partial(cls, raw, path, ctx))


# --------------------------------------------------------------------------- validation
def _build_service(merged: Mapping[str, Any], ctx: Context) -> ServiceConfig:
    for key in merged:
        if key not in settable(ServiceConfig):
            ctx.unknown(str(key), key, settable(ServiceConfig) | {"router"})
    server = _build(ServerConfig, merged.get("server"), "server", ctx)
    _check_server(server, ctx)
    cache_ = _build(CacheConfig, merged.get("cache"), "cache", ctx)
    breaker = _build(BreakerConfig, merged.get("breaker"), "breaker", ctx)
    _check_breaker(breaker, ctx)
    batching = _build(BatchingConfig, merged.get("batching"), "batching", ctx)
    testing = _build(TestingConfig, merged.get("testing"), "testing", ctx)
    config = ServiceConfig(
        server=server,
        metrics=_build(MetricsConfig, merged.get("metrics"), "metrics", ctx),
        health=_build(HealthConfig, merged.get("health"), "health", ctx),
        batching=batching,
        cache=cache_,
        breaker=breaker,
        monitoring=replace(
            _build(MonitoringConfig, merged.get("monitoring"), "monitoring", ctx),
            enable_circuit_breaker=breaker.enabled,
        ),
        security=_build_security(merged.get("security"), ctx),
        optimization=replace(
            _build(OptimizationConfig, merged.get("optimization"), "optimization", ctx),
            enable_caching=cache_.enabled,
            max_workers=server.max_workers,
            cache_size=cache_.cache_size,
        ),
        benchmarking=_build(BenchmarkingConfig, merged.get("benchmarking"), "benchmarking", ctx),
        testing=testing,
        routers=_build_routers(merged.get("routers"), ctx, batching, testing),
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
    security = _build(SecurityConfig, raw, "security", ctx)
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


def _build_routers(
    raw: Any, ctx: Context, batching: BatchingConfig, testing: TestingConfig
) -> tuple[RouterSpec, ...]:
    if not isinstance(raw, (list, tuple)) or not raw:
        ctx.fail("routers", "must be a non-empty list of routers (name, kind, input_dim, "
                 f"num_experts, ...), got {describe(raw)}")
    specs: list[RouterSpec] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(raw):
        spec = _build_router(item, f"routers[{i}]", ctx, batching, testing)
        if spec.name in first_index:
            ctx.fail(f"routers[{i}].name", f"duplicate router name {spec.name!r} (also "
                     f"routers[{first_index[spec.name]}]); names must be unique")
        first_index[spec.name] = i
        specs.append(spec)
    return tuple(specs)


_REQUIRED = ("name", "kind", "input_dim", "num_experts")


def _build_router(
    raw: Any, path: str, ctx: Context, batching: BatchingConfig, testing: TestingConfig
) -> RouterSpec:
    if not isinstance(raw, Mapping):
        ctx.fail(path, f"must be a mapping with {', '.join(_REQUIRED)}, got {describe(raw)}")
    for key in _REQUIRED:
        if key not in raw:
            ctx.fail(path, f"missing required key {key!r}")
    kind = _convert(raw["kind"], RouterKind, f"{path}.kind", ctx, {})
    if kind_entry(kind).test_only and not testing.enable_fault_injection:
        ctx.fail(f"{path}.kind", f"{kind.value!r} routers exist only for tests; set "
                 "testing.enable_fault_injection: true to allow them")
    spec_fields = schema(RouterSpec)
    for key in raw:
        kinds = spec_fields[key][0].metadata["kinds"] if key in spec_fields else None
        if kinds is not None and kind not in kinds:
            used_by = ", ".join(sorted(k.value for k in kinds))
            ctx.fail(f"{path}.{key}", f"is not used by kind {kind.value!r} (only by {used_by}); "
                     "remove it")
    rest = {k: v for k, v in raw.items() if k not in ("batching", "weights")}
    values = _build_partial(RouterSpec, rest, path, ctx)
    overrides = _build_partial(BatchingConfig, raw.get("batching"), f"{path}.batching", ctx)
    values["batching"] = replace(batching, **overrides)
    values["weights"] = _build_weights(raw.get("weights"), f"{path}.weights", ctx)
    if kind is RouterKind.FAULT_INJECTION and values.get("fault") is None:
        values["fault"] = FaultSpec()
    spec = RouterSpec(**values, source=ctx.display(path))
    _check_router(spec, path, ctx)
    return spec


def _build_weights(raw: Any, path: str, ctx: Context) -> WeightsSpec:
    values = _build_partial(WeightsSpec, raw, path, ctx)
    checkpoint = values.get("path")
    if checkpoint is None:
        if "init" in values and values["init"] is None:
            ctx.fail(path, "needs init: random or a path to a safetensors checkpoint")
        for key in ("gate", "bias", "layer_offset"):
            if key in values:
                ctx.fail(f"{path}.{key}", "is used only with path (a checkpoint); set path or "
                         "remove it")
        return WeightsSpec(**values)
    if values.get("init") is not None:
        ctx.fail(f"{path}.init", "give either init: random or path, not both")
    if "seed" in values:
        ctx.fail(f"{path}.seed", "is used only with init: random; remove it")
    if not checkpoint.name.endswith((".safetensors", ".json")):
        ctx.fail(f"{path}.path", "must be a .safetensors file or a sharded "
                 f"model.safetensors.index.json, got {checkpoint.name!r} (pickle checkpoints "
                 "are never loaded; convert them with safetensors)")
    if not checkpoint.is_file():
        ctx.fail(f"{path}.path", f"checkpoint not found: {checkpoint}")
    if values.get("gate") is None:
        ctx.fail(f"{path}.gate", "is required with path: the gate weight's tensor name, e.g. "
                 "'model.layers.{layer}.mlp.gate.weight'")
    for key in ("gate", "bias"):
        template = values.get(key)
        try:
            if template is not None:
                template.format(layer=0)
        except (KeyError, IndexError, ValueError):
            ctx.fail(f"{path}.{key}", "must be a tensor name whose only placeholder is "
                     f"{{layer}}, got {template!r}")
    return WeightsSpec(**{**values, "init": None})


def _check_router(spec: RouterSpec, path: str, ctx: Context) -> None:
    """Cross-field checks of one router; RouterConfig's and the class's own are reused."""
    try:
        config = spec.router_config()
    except RouterConfigurationError as exc:
        raise RouterConfigurationError(router_error(spec.source, str(exc))) from None
    weights = spec.weights
    if weights.path is not None:
        if spec.layers > 1 and "{layer}" not in (weights.gate or ""):
            ctx.fail(f"{path}.weights.gate", "must contain '{layer}' when layers > 1 (or every "
                     "layer loads the same tensor)")
        if weights.bias is not None and not spec.use_correction_bias:
            ctx.fail(f"{path}.weights.bias", "needs kind grouped_top_k with use_correction_bias: "
                     "true (only that router has an e_score_correction_bias)")
        if weights.bias is None and spec.use_correction_bias:
            ctx.fail(f"{path}.weights.bias", "is required because use_correction_bias is true, "
                     "e.g. 'model.layers.{layer}.mlp.gate.e_score_correction_bias'")
        if spec.kind is RouterKind.MOE_ROUTER and spec.hidden_layers:
            ctx.fail(f"{path}.weights.path", "kind moe_router with hidden_layers has parameters "
                     "besides the gate; only init: random is supported")
    entry = kind_entry(spec.kind)
    try:
        with torch.device("meta"):  # the class's own constructor checks, nothing allocated
            entry.construct(config, entry.arguments_from(spec))
    except RouterConfigurationError as exc:
        raise RouterConfigurationError(router_error(spec.source, str(exc))) from None


def router_error(source: str, message: str) -> str:
    """Prefix a router's own error (``"top_k: must be ..."``) with the spec's key path."""
    match = re.match(r"([a-z_]+): (.*)", message, re.S)
    if match:
        key = "input_dim" if match[1] == "hidden_size" else match[1]
        if key in schema(RouterSpec):
            return f"{source}.{key}: {match[2]}"
    return f"{source}: {message}"


def _check_env_names(env: Mapping[str, str], api_keys_env: str) -> None:
    """A ``DYNAMIC_MOE_*`` variable the config does not read is a typo; say which."""
    known = set(env_fields()) | {CONFIG_PATH_ENV, api_keys_env, "DYNAMIC_MOE_API_KEYS"}
    for var in env:
        if var.startswith(_ENV_PREFIX) and var not in known:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
            raise RouterConfigurationError(f"environment variable {var}: unknown; {hint}")
