"""The typed shape of config.yaml: frozen dataclasses, one documented field per key.

:mod:`moe_router.config` fills these from the file, the environment and overrides and
runs every check; the metadata on each field (``doc``, ``env``, bounds, the router kinds
that use it) drives that loader, so a key's type, default, variable and limits are
declared here once. Import them from :mod:`moe_router.config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from moe_router.config.fields import MiB
from moe_router.config.fields import config_field as _field
from moe_router.config.router_schema import (
    BatchingConfig,
    FaultSpec,
    RouterKind,
    RouterSpec,
    WeightsInit,
    WeightsSpec,
)

__all__ = [
    "ALIASES",
    "LogLevel",
    "RouterKind",
    "ExpertGranularity",
    "WeightsInit",
    "ServerConfig",
    "MetricsConfig",
    "HealthConfig",
    "BatchingConfig",
    "CacheConfig",
    "BreakerConfig",
    "AlertThresholds",
    "MonitoringConfig",
    "TLSConfig",
    "SecurityConfig",
    "CoLocatedConfig",
    "OptimizationConfig",
    "BenchmarkingConfig",
    "TestingConfig",
    "WeightsSpec",
    "FaultSpec",
    "RouterSpec",
    "ServiceConfig",
]


ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "monitoring.enable_circuit_breaker": "breaker.enabled",
        "optimization.enable_caching": "cache.enabled",
        "optimization.max_workers": "server.max_workers",
        "optimization.cache_size": "cache.cache_size",
    }
)
"""Seed keys kept as aliases: alias path -> the key it sets."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
"""A ``logging`` level name (config accepts any case and stores it upper-case)."""




class ExpertGranularity(str, Enum):
    """How finely the per-expert load is exported to Prometheus (series per router:
    ``layer`` L x E counters + L scores, ``router`` E counters, ``off`` none)."""

    LAYER = "layer"
    ROUTER = "router"
    OFF = "off"




@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The gRPC server: address, device, limits and shutdown."""

    host: str = _field("127.0.0.1", "Listen address; 0.0.0.0 accepts remote clients.")
    port: int = _field(50051, "gRPC port; 0 picks a free one.", env="DYNAMIC_MOE_PORT",
                       lo=0, hi=65535)
    device: str = _field("auto", "auto | cpu | cuda | cuda:N (auto: CUDA when available).",
                         env="DYNAMIC_MOE_DEVICE", pattern=r"auto|cpu|cuda(:[0-9]+)?",
                         pattern_help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    max_message_bytes: int = _field(256 * MiB, "Largest request or response message.", lo=1)
    max_in_flight_calls: int = _field(256, "Route calls (RouteStream messages included) held "
                                      "at once; more are refused RESOURCE_EXHAUSTED before "
                                      "their message is read.", lo=1)
    max_in_flight_bytes: int = _field(512 * MiB, "Request bytes of the Route calls held at "
                                      "once; a call past it is refused RESOURCE_EXHAUSTED "
                                      "(one call is always admitted when none is held).", lo=1)
    read_ahead_bytes: int = _field(MiB, "Bytes of a Route call's message the transport "
                                   "reads before admission admits the call (its HTTP/2 "
                                   "stream window; capped at max_message_bytes). Larger "
                                   "saves window updates on large calls; refused calls "
                                   "then bring that much into memory too.",
                                   lo=64 * 1024, hi=(1 << 31) - 1)
    max_concurrent_rpcs: int = _field(4096, "gRPC's own bound on every RPC at once (health "
                                      "watches and Stats too); must exceed "
                                      "max_in_flight_calls.", lo=2)
    max_connection_age_s: float = _field(300.0, "Connections are recycled after this age.",
                                         gt=0)
    max_connection_age_grace_s: float = _field(30.0, "Grace for calls on a recycled "
                                               "connection.", lo=0)
    drain_delay_s: float = _field(0.0, "On SIGTERM, health turns NOT_SERVING and calls are "
                                  "still served this long (for load balancers to notice), "
                                  "before new calls are refused.", lo=0)
    drain_grace_s: float = _field(20.0, "Then in-flight calls get this long to finish.", lo=0)
    intra_op_threads: int = _field(1, "torch intra-op threads of the process (each device "
                                   "pass). 1 keeps merged passes bit-identical to routing "
                                   "alone; with more, CPU calls are never merged.", lo=1)
    max_workers: int = _field(4, "Device executor threads (at most one per CPU core).",
                              env="DYNAMIC_MOE_MAX_WORKERS", lo=1)
    log_level: LogLevel = _field("INFO", "Logging level name.", env="DYNAMIC_MOE_LOG_LEVEL")
    busy_poll_us: int = _field(300, "After a wake-up with work, the event loop polls this "
                               "long for the next message before it sleeps (0: never); "
                               "saves the wake-up of a small call's ping-pong.",
                               lo=0, hi=100_000)
    event_loop_cpu: int | None = _field(None, "Pin the event loop and gRPC's completion-queue "
                                        "thread, which every call passes through, to this "
                                        "CPU (the other threads keep all of the process's); "
                                        "null: no pinning. Cuts a small call's latency; "
                                        "both threads then share one core's throughput.",
                                        env="DYNAMIC_MOE_EVENT_LOOP_CPU", lo=0)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """The Prometheus /metrics HTTP endpoint."""

    enabled: bool = _field(True, "Serve Prometheus metrics.", env="DYNAMIC_MOE_ENABLE_MONITORING")
    host: str = _field("127.0.0.1", "Listen address of the metrics endpoint.")
    port: int = _field(9090, "Metrics port; 0 picks a free one.", env="DYNAMIC_MOE_METRICS_PORT",
                       lo=0, hi=65535)
    expert_granularity: ExpertGranularity = _field(
        ExpertGranularity.LAYER,
        "Per-expert load series: layer (L x E per router), router (E), or off.",
        env="DYNAMIC_MOE_METRICS_EXPERT_GRANULARITY")
    load_window_s: float = _field(
        300.0, "Seconds of traffic the recent load-balance figures cover.", gt=0)


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """The plain-HTTP /healthz and /readyz endpoint for probes that do not speak gRPC."""

    enabled: bool = _field(True, "Serve /healthz and /readyz.")
    host: str = _field("127.0.0.1", "Listen address of the health endpoint.")
    port: int = _field(8080, "Health port; 0 picks a free one.", env="DYNAMIC_MOE_HEALTH_PORT",
                       lo=0, hi=65535)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The answer cache in front of each router."""

    enabled: bool = _field(True, "Cache answers (also optimization.enable_caching).",
                           env="DYNAMIC_MOE_ENABLE_CACHING")
    cache_size: int = _field(1000, "Most cached answers (also optimization.cache_size).",
                             env="DYNAMIC_MOE_CACHE_SIZE", lo=1)
    max_bytes: int = _field(256 * MiB, "Most bytes of cached answers.", lo=1)
    ttl_seconds: float = _field(300.0, "An answer expires this long after it was cached.", gt=0)
    adaptive: bool = _field(True, "Stop caching a router whose hit rate stays near zero.")


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """The per-router circuit breaker (count-based sliding window, resilience4j-style)."""

    enabled: bool = _field(True, "Fail fast while a router keeps failing "
                           "(also monitoring.enable_circuit_breaker).")
    sliding_window_size: int = _field(100, "Outcomes of the last N calls are kept.", lo=1)
    minimum_number_of_calls: int = _field(10, "Calls needed before the rates are judged.", lo=1)
    failure_rate_threshold: float = _field(0.5, "Failure fraction that opens the breaker.",
                                           gt=0, hi=1)
    slow_call_rate_threshold: float = _field(1.0, "Slow-call fraction that opens the breaker.",
                                             gt=0, hi=1)
    slow_call_duration_ms: float = _field(1000.0, "A call slower than this counts as slow.",
                                          gt=0)
    wait_duration_s: float = _field(5.0, "First open period before a trial call.", gt=0)
    max_wait_duration_s: float = _field(60.0, "Longest open period after repeated trips.", gt=0)
    wait_multiplier: float = _field(2.0, "Open period grows by this factor per failed trial.",
                                    lo=1)
    permitted_calls_in_half_open: int = _field(3, "Trial calls allowed while half-open.", lo=1)


@dataclass(frozen=True, kw_only=True)
class AlertThresholds:
    """Levels beyond which the monitoring wrapper raises an alert (seed keys)."""

    avg_latency_ms: float = _field(50.0, "Mean routing latency.", gt=0)
    error_rate: float = _field(0.05, "Fraction of failed calls.", lo=0, hi=1)
    load_balance_variance: float = _field(0.1, "Variance of per-expert load fractions.", lo=0)
    memory_usage_mb: float = _field(1000.0, "Process memory.", gt=0)


@dataclass(frozen=True, kw_only=True)
class MonitoringConfig:
    """Seed monitoring keys: alert thresholds and webhook."""

    enable_circuit_breaker: bool = _field(True, "Alias of breaker.enabled (mirrors it).",
                                          alias_of="breaker.enabled")
    alert_thresholds: AlertThresholds = _field(doc="Alert levels.", factory=AlertThresholds)
    alert_webhook: str = _field("", "URL alerts are POSTed to; empty for none.",
                                env="DYNAMIC_MOE_ALERT_WEBHOOK")


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """Server TLS; mutual TLS when a client CA is given."""

    enabled: bool = _field(False, "Serve over TLS (needs cert_file and key_file).",
                           env="DYNAMIC_MOE_SSL_ENABLED")
    cert_file: Path | None = _field(None, "PEM certificate chain of the server.")
    key_file: Path | None = _field(None, "PEM private key of the server.")
    client_ca_file: Path | None = _field(None, "PEM CA bundle; when set, clients must "
                                         "present a certificate it signed.")


@dataclass(frozen=True, kw_only=True)
class SecurityConfig:
    """API keys, rate limiting and TLS."""

    api_key_required: bool = _field(False, "Refuse calls without a known API key.",
                                    env="DYNAMIC_MOE_API_KEY_REQUIRED")
    api_keys_file: Path | None = _field(None, "File of API keys, one per line, '#' comments.")
    api_keys_env: str = _field("DYNAMIC_MOE_API_KEYS", "Environment variable holding "
                               "comma-separated API keys.", pattern=r"[A-Za-z_][A-Za-z0-9_]*",
                               pattern_help="an environment variable name")
    api_keys: tuple[str, ...] = _field((), "The resolved keys (file + variable); never "
                                       "written in config.yaml, never shown.", derived=True,
                                       repr=False)
    rate_limit: int = _field(0, "Requests per hour per API key (or peer); 0 is off.",
                             env="DYNAMIC_MOE_RATE_LIMIT", lo=0)
    tls: TLSConfig = _field(doc="Transport security.", factory=TLSConfig)


@dataclass(frozen=True, kw_only=True)
class CoLocatedConfig:
    """The co-located door: Route over a unix socket and shared memory, for callers on
    the same host running as the server's user (README "The co-located door")."""

    enabled: bool = _field(True, "Serve co-located callers on a unix socket.")
    socket_path: Path | None = _field(None, "The socket; null: /tmp/moe-router-<uid>/"
                                      "colocated-<gRPC port>.sock (a 0700 directory).")


@dataclass(frozen=True, kw_only=True)
class OptimizationConfig:
    """Seed optimization keys; three are aliases whose values mirror their targets."""

    enable_autoscaling: bool = _field(True, "Let the optimized wrapper grow its worker pool.",
                                      env="DYNAMIC_MOE_AUTOSCALE")
    enable_parallel: bool = _field(True, "Let the optimized wrapper route chunks in parallel.")
    enable_caching: bool = _field(True, "Alias of cache.enabled (mirrors it).",
                                  alias_of="cache.enabled")
    max_workers: int = _field(4, "Alias of server.max_workers (mirrors it).",
                              alias_of="server.max_workers")
    cache_size: int = _field(1000, "Alias of cache.cache_size (mirrors it).",
                             alias_of="cache.cache_size")


@dataclass(frozen=True, kw_only=True)
class BenchmarkingConfig:
    """Seed benchmarking keys: defaults for ``moe-router bench``."""

    num_runs: int = _field(100, "Timed repetitions per case.", lo=1)
    warmup_runs: int = _field(10, "Untimed repetitions before timing.", lo=0)
    batch_sizes: tuple[int, ...] = _field((1, 8, 16, 32), "Batch sizes to sweep.", lo=1)
    sequence_lengths: tuple[int, ...] = _field((128, 256, 512), "Sequence lengths to sweep.",
                                               lo=1)


@dataclass(frozen=True, kw_only=True)
class TestingConfig:
    """Switches that exist only for tests."""

    __test__ = False  # not a pytest test class despite the name

    enable_fault_injection: bool = _field(False, "Allow routers of kind fault_injection.")


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """The whole service configuration, as :func:`moe_router.config.load_config` returns it."""

    server: ServerConfig = _field(doc="gRPC server.", factory=ServerConfig)
    metrics: MetricsConfig = _field(doc="Prometheus endpoint.", factory=MetricsConfig)
    health: HealthConfig = _field(doc="HTTP health endpoint.", factory=HealthConfig)
    batching: BatchingConfig = _field(doc="Batching defaults of every router.",
                                      factory=BatchingConfig)
    cache: CacheConfig = _field(doc="Answer cache.", factory=CacheConfig)
    breaker: BreakerConfig = _field(doc="Circuit breaker.", factory=BreakerConfig)
    monitoring: MonitoringConfig = _field(doc="Alerts (seed keys).", factory=MonitoringConfig)
    security: SecurityConfig = _field(doc="Keys, rate limit, TLS.", factory=SecurityConfig)
    colocated: CoLocatedConfig = _field(doc="The co-located (shared-memory) door.",
                                        factory=CoLocatedConfig)
    optimization: OptimizationConfig = _field(doc="Seed optimization keys.",
                                              factory=OptimizationConfig)
    benchmarking: BenchmarkingConfig = _field(doc="Benchmark defaults (seed keys).",
                                              factory=BenchmarkingConfig)
    testing: TestingConfig = _field(doc="Test-only switches.", factory=TestingConfig)
    routers: tuple[RouterSpec, ...] = _field(doc="The hosted routers (non-empty, unique "
                                             "names).", factory=tuple)
    source: str = _field("<embedded default config.yaml>", "The file this config was read "
                         "from.", derived=True)
