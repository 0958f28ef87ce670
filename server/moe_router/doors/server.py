"""Assembles a running moe-router: routers, chains, gRPC server, metrics and health servers.

``create_server()`` starts everything and returns a handle (tests use it with port 0);
``serve()`` blocks until SIGTERM/SIGINT, then drains: health turns NOT_SERVING first,
new calls are refused, in-flight calls finish within ``drain_grace_s``, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from moe_router import __version__
from moe_router.chain.alerts import AlertMonitor
from moe_router.chain.hosted import HostedRouterChain, build_chain
from moe_router.chain.metrics import RouterMetrics, start_metrics_http_server
from moe_router.chain.pool import DevicePool
from moe_router.config import ServiceConfig
from moe_router.doors.colocated import CoLocatedDoor
from moe_router.doors.health import HealthState, RouterStatus, start_http_health_server
from moe_router.doors.oip_service import OIP_SERVICE_NAME, add_oip_service, reflection_pool
from moe_router.doors.security import ApiKeyInterceptor, server_credentials
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.doors.v1_service import RouterService, add_router_service
from moe_router.loading.registry import load_routers, resolve_device, warm_up
from moe_router_client.colocated_wire import default_socket_path
from moe_router_client.v1 import router_pb2 as pb

__all__ = ["RunningServer", "create_server", "serve", "grpc_server_options"]

log = logging.getLogger("moe_router")

ALERT_PERIOD_S = 2.0  # how often routers' figures are judged against the alert thresholds


def grpc_server_options(config: ServiceConfig) -> list[tuple[str, Any]]:
    """gRPC Python's defaults, corrected for a serving replica (see README "Server")."""
    s = config.server
    return [
        # Off: otherwise a second server on the same port silently shares its traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # Clients balancing over DNS reconnect periodically and find new replicas.
        ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
    ]


@dataclass
class RunningServer:
    """Handles of a started server; ``stop()`` drains it."""

    config: ServiceConfig
    server: grpc.aio.Server
    port: int
    health: HealthState
    chains: dict[str, HostedRouterChain]
    pool: DevicePool
    registry: CollectorRegistry
    metrics_port: int | None = None
    health_port: int | None = None
    _closers: list[Any] = field(default_factory=list)
    colocated: CoLocatedDoor | None = None
    """The co-located door (None when ``colocated.enabled`` is off)."""

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING first, refuse new calls, let in-flight ones finish, stop."""
        await self.health.mark_draining()
        await self.server.stop(self.config.server.drain_grace_s if grace is None else grace)
        for close in self._closers:
            close()
        self.pool.shutdown(wait=False, cancel_futures=True)


async def create_server(
    config: ServiceConfig, *, registry: CollectorRegistry | None = None
) -> RunningServer:
    """Start the gRPC server (health NOT_SERVING), load every router, then turn SERVING."""
    device = resolve_device(config.server.device)
    names = [spec.name for spec in config.routers]
    health = HealthState(names)
    chains: dict[str, HostedRouterChain] = {}
    registry = registry if registry is not None else CollectorRegistry()
    metrics = None
    if config.metrics.enabled:
        # Counters without their `_created` twins: half the series, nothing lost.
        prometheus_client.disable_created_metrics()
        metrics = RouterMetrics(registry, expert_granularity=config.metrics.expert_granularity)

    interceptors = []
    if config.security.api_key_required:
        interceptors.append(ApiKeyInterceptor(config.security.api_keys))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=grpc_server_options(config),
        maximum_concurrent_rpcs=config.server.max_concurrent_rpcs,
    )
    alerts = AlertMonitor(config.monitoring.alert_thresholds, config.monitoring.alert_webhook)
    service = RouterService(
        chains, health, device=str(device), version=__version__, alerts=alerts
    )
    add_router_service(service, server)
    regions = SharedMemoryRegistry()  # one per server: the OIP and co-located doors share it
    add_oip_service(chains, health, server, version=__version__, regions=regions)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflected = (
        pb.DESCRIPTOR.services_by_name["RouterService"].full_name,
        OIP_SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(reflected, server, pool=reflection_pool(reflected))
    address = f"{config.server.host}:{config.server.port}"
    tls = config.security.tls
    try:  # grpcio raises on a taken port in some versions and returns 0 in others
        if tls.enabled:
            if tls.cert_file is None or tls.key_file is None:  # config.py refuses this already
                raise ValueError("security.tls.enabled needs cert_file and key_file")
            port = server.add_secure_port(
                address, server_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)
            )
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(
            f"server.port: could not listen on {address} (in use?); choose another port "
            "(server.port, --port or DYNAMIC_MOE_PORT; 0 picks a free one)"
        )
    closers: list[Any] = [regions.close]
    metrics_port = health_port = None
    door = None
    try:  # every port is bound before the routers load, so a clash fails fast
        if config.colocated.enabled:
            door = _colocated_door(config, chains, health, regions, device, port)
            door.start()
            closers.insert(0, door.close)  # before the regions it registered are closed
        if metrics is not None:
            metrics.set_build_info(__version__, str(device))
            http, _, metrics_port = _bind_http(
                start_metrics_http_server, registry, config.metrics, "metrics",
                "DYNAMIC_MOE_METRICS_PORT",
            )
            closers.append(http.shutdown)
        if config.health.enabled:
            http, _, health_port = _bind_http(
                start_http_health_server, health, config.health, "health",
                "DYNAMIC_MOE_HEALTH_PORT",
            )
            closers.append(http.shutdown)
    except BaseException:  # a port or the socket path refused: release what was bound
        for close in closers:
            close()
        raise
    await health.publish()  # every name NOT_SERVING (and /readyz 503) until loaded
    await server.start()

    # Workers start on demand up to server.max_workers (all at once with
    # optimization.enable_autoscaling off); the in-process optimized router uses it too.
    pool = DevicePool(
        max_workers=config.server.max_workers,
        autoscale=config.optimization.enable_autoscaling,
        name="device",
    )
    loop = asyncio.get_running_loop()

    def on_breaker_change(router: str, old: str, new: str) -> None:
        status = RouterStatus.DEGRADED if new != "CLOSED" else RouterStatus.SERVING
        detail = f"circuit breaker {new}" if new != "CLOSED" else ""
        loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(health.set_router(router, status, detail))
        )
        if metrics is not None:
            metrics.breaker_transition(router, old, new)

    try:
        hosted = await asyncio.to_thread(load_routers, config)
        await asyncio.to_thread(warm_up, hosted)
    except BaseException:
        await server.stop(0)
        pool.shutdown(wait=False)
        for close in closers:
            close()
        raise
    shared_limit = None  # one rate-limit bucket per caller across every router
    for name, router in hosted.items():
        chains[name] = build_chain(
            router, config, pool, metrics, on_breaker_change, rate_limit_shared_with=shared_limit
        )
        shared_limit = shared_limit or chains[name].rate_limit
    running = RunningServer(
        config, server, port, health, chains, pool, registry, metrics_port, health_port, closers,
        colocated=door,
    )
    await health.mark_ready()
    watcher = asyncio.ensure_future(_watch_alerts(chains, alerts))
    running._closers.append(watcher.cancel)
    return running


def _colocated_door(
    config: ServiceConfig,
    chains: dict[str, HostedRouterChain],
    health: HealthState,
    regions: SharedMemoryRegistry,
    device: Any,
    port: int,
) -> CoLocatedDoor:
    """The co-located door on ``colocated.socket_path`` (default: by the gRPC port)."""
    configured = config.colocated.socket_path
    path = configured if configured is not None else default_socket_path(port, os.geteuid())
    keys = config.security.api_keys if config.security.api_key_required else ()
    return CoLocatedDoor(
        chains, health, regions, socket_path=Path(path), default_directory=configured is None,
        api_keys=keys, device=device, version=__version__,
    )


def _bind_http(start: Any, source: Any, section: Any, key: str, variable: str) -> Any:
    """Start one of the HTTP endpoints; a port clash names the key that sets the port."""
    try:
        return start(source, section.host, section.port)
    except OSError as exc:
        raise OSError(
            f"{key}.port: could not listen on {section.host}:{section.port} ({exc.strerror}); "
            f"choose another port ({key}.port or {variable}; 0 picks a free one)"
        ) from exc


async def _watch_alerts(chains: dict[str, HostedRouterChain], alerts: AlertMonitor) -> None:
    """Judge every router's figures against the alert thresholds every few seconds."""
    while True:
        for name, chain in chains.items():
            alerts.update(name, chain.alert_figures())
        await asyncio.sleep(ALERT_PERIOD_S)


async def _serve(config: ServiceConfig) -> None:
    running = await create_server(config)
    if running.metrics_port is not None:
        print(f"metrics on http://{config.metrics.host}:{running.metrics_port}/metrics", flush=True)
    if running.health_port is not None:
        print(f"health on http://{config.health.host}:{running.health_port}/readyz", flush=True)
    if running.colocated is not None:
        print(f"co-located door on unix:{running.colocated.socket_path}", flush=True)
    # Last: scripts and tests wait for this line, and the lines above are out by then.
    print(f"listening on {config.server.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: finishing in-flight calls within %.1fs", config.server.drain_grace_s)
    await running.stop()
    log.info("stopped")


def serve(config: ServiceConfig) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit status (0 after a drain)."""
    logging.basicConfig(
        level=config.server.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(_serve(config))
    return 0
