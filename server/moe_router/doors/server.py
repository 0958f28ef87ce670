"""Assembles a running moe-router: routers, chains, gRPC server, metrics and health servers.

``create_server()`` starts everything and returns a handle (tests use it with port 0);
``serve()`` blocks until SIGTERM/SIGINT, then drains (:meth:`RunningServer.drain`):

1. health turns NOT_SERVING (grpc.health.v1, Health, ``/readyz``) while Route is still
   served for ``server.drain_delay_s`` (what Kubernetes' preStop gives load balancers);
2. new calls are refused UNAVAILABLE ``DRAINING`` (the client's retry policy resends
   them to another replica) and the calls held finish within ``drain_grace_s``;
3. grpc.health.v1 Watch streams end, and the process exits 0.

The process exits without grpc core's shutdown (``os._exit`` once the drain has answered
every call and the logs are flushed): core's shutdown cancels the calls it has accepted
but not yet handed to the application, so the calls that keep arriving from clients that
have not noticed the drain ended CANCELLED (13 of 16 under load). Closing the sockets
instead makes them UNAVAILABLE at their clients, which the retry policy resends. Exiting
before the interpreter's finalisation also ends the "terminate called without an active
exception" aborts (exit -6) that C++ threads still running at finalisation caused.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import torch
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from moe_router import __version__
from moe_router.chain.alerts import AlertMonitor
from moe_router.chain.hosted import HostedRouterChain, build_chain
from moe_router.chain.metrics import RouterMetrics, start_metrics_http_server
from moe_router.chain.pool import DevicePool
from moe_router.config import ServiceConfig
from moe_router.doors.admission import Admission
from moe_router.doors.busy_poll import BusyPollSelector
from moe_router.doors.colocated import CoLocatedDoor
from moe_router.doors.cpu_pinning import pin_event_loop
from moe_router.doors.health import (
    HealthState,
    RouterStatus,
    add_health_service,
    start_http_health_server,
)
from moe_router.doors.oip_service import OIP_SERVICE_NAME, add_oip_service, reflection_pool
from moe_router.doors.reflection import V1ALPHA_SERVICE_NAME, enable_reflection
from moe_router.doors.security import ApiKeyInterceptor, server_credentials
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.doors.v1_service import RouterService, add_router_service
from moe_router.loading.registry import load_routers, resolve_device, warm_up
from moe_router_client.colocated_wire import default_socket_path
from moe_router_client.v1 import router_pb2 as pb

__all__ = ["RunningServer", "create_server", "serve", "grpc_server_options"]

log = logging.getLogger("moe_router")

ALERT_PERIOD_S = 2.0  # how often routers' figures are judged against the alert thresholds

MAX_FRAME_BYTES = 1 << 20
"""The largest HTTP/2 frame the server accepts (gRPC's default is 16 KiB), and never more
than the read-ahead (``server.read_ahead_bytes``): a window's worth of a message may come
as one frame instead of 64. Measured against 16 KiB frames, same server otherwise, one
caller taking turns with the echo: 16 tokens 917 -> 858 us p50, 256 tokens (4 MiB) 4041 ->
3832 and 3913 -> 3735 us. A frame never holds more than the window lets the client send,
so memory is bounded as before.

The read-ahead itself (the stream window a call opens with) is ``server.read_ahead_bytes``,
1 MiB by default: gRPC's 64 KiB made a 256 KiB Route (16 tokens of 4096 fp32) wait for a
window update after admission (1005 -> 830 us p50 with 1 MiB), while admission still bounds
the rest (40 callers of 8 MiB: peak RSS +269 MiB with 64 KiB, +288 with 1 MiB, +334-372
with 2 MiB). README "The server" gives the trade for larger calls."""

MIN_FRAME_BYTES = 16 * 1024  # HTTP/2's least allowed SETTINGS_MAX_FRAME_SIZE


def grpc_server_options(config: ServiceConfig) -> list[tuple[str, Any]]:
    """gRPC Python's defaults, corrected for a serving replica (see README "Server")."""
    s = config.server
    read_ahead = min(s.read_ahead_bytes, s.max_message_bytes)
    return [
        # Off: otherwise a second server on the same port silently shares its traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # Clients balancing over DNS reconnect periodically and find new replicas.
        ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
        # Off: the transport would otherwise grow each stream's window and read requests
        # before admission control asked for them (measured: 40 callers of 8 MiB took
        # the peak RSS from +269 to +811 MiB).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", read_ahead),
        ("grpc.http2.max_frame_size",
         max(MIN_FRAME_BYTES, min(read_ahead, MAX_FRAME_BYTES))),
    ]


@dataclass(frozen=True)
class DrainFigures:
    """How a drain went: the seconds each phase took and whether every call was answered."""

    delay_s: float
    wait_s: float
    answered_all: bool


@dataclass
class RunningServer:
    """Handles of a started server; ``drain()`` then ``stop()`` shut it down."""

    config: ServiceConfig
    server: grpc.aio.Server
    port: int
    health: HealthState
    chains: dict[str, HostedRouterChain]
    pool: DevicePool
    registry: CollectorRegistry
    admission: Admission
    metrics_port: int | None = None
    health_port: int | None = None
    _closers: list[Any] = field(default_factory=list)
    colocated: CoLocatedDoor | None = None
    """The co-located door (None when ``colocated.enabled`` is off)."""

    async def drain(
        self, delay: float | None = None, grace: float | None = None
    ) -> DrainFigures:
        """NOT_SERVING while still serving for ``delay`` s (``server.drain_delay_s``),
        then refuse new calls and wait up to ``grace`` s (``drain_grace_s``) for the calls
        held; end the health watches."""
        s = self.config.server
        delay = s.drain_delay_s if delay is None else delay
        grace = s.drain_grace_s if grace is None else grace
        started = time.monotonic()
        await self.health.mark_draining()
        if delay > 0:
            await asyncio.sleep(delay)
        closed = time.monotonic()
        self.admission.close()
        answered_all = await self.admission.wait_idle(grace)
        self.health.servicer.close_watches()
        return DrainFigures(closed - started, time.monotonic() - closed, answered_all)

    async def stop(self, grace: float | None = None) -> None:
        """Drain without delay (``grace``: ``drain_grace_s``), then stop gRPC, the HTTP
        endpoints and the device pool (in-process servers; ``serve`` exits instead)."""
        grace = self.config.server.drain_grace_s if grace is None else grace
        await self.drain(delay=0.0, grace=grace)
        await self.server.stop(grace)
        self.release()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def release(self) -> None:
        """Close what the server holds outside gRPC: the HTTP endpoints, the co-located
        door's socket file, the shared-memory mappings, the alert watcher."""
        for close in self._closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - release the rest, say what failed
                log.warning("closing %r failed: %s", close, exc)


async def create_server(
    config: ServiceConfig, *, registry: CollectorRegistry | None = None
) -> RunningServer:
    """Start the gRPC server (health NOT_SERVING), load every router, then turn SERVING."""
    # Process-wide, before the device pool starts its threads (each reads it once).
    torch.set_num_threads(config.server.intra_op_threads)
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
    admission = Admission(config.server.max_in_flight_calls, config.server.max_in_flight_bytes)
    service = RouterService(
        chains, health, device=str(device), version=__version__, alerts=alerts,
        admission=admission,
    )
    add_router_service(service, server)
    regions = SharedMemoryRegistry()  # one per server: the OIP and co-located doors share it
    add_oip_service(chains, health, server, version=__version__, regions=regions,
                    admission=admission)
    add_health_service(health.servicer, server)
    reflected = (
        pb.DESCRIPTOR.services_by_name["RouterService"].full_name,
        OIP_SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    )
    enable_reflection(reflected, server,
                      pool=reflection_pool((*reflected, V1ALPHA_SERVICE_NAME)))
    address = f"{config.server.host}:{config.server.port}"
    tls = config.security.tls
    with _core_log_captured() as core_log:
        try:  # grpcio raises on a taken port in some versions and returns 0 in others
            if tls.enabled:
                if tls.cert_file is None or tls.key_file is None:  # config refuses this
                    raise ValueError("security.tls.enabled needs cert_file and key_file")
                port = server.add_secure_port(
                    address, server_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)
                )
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        core_log.keep = port != 0
    if port == 0:
        log.debug("gRPC core on the refused port: %s", core_log.text.strip())
        raise OSError(
            f"server.port: could not listen on {address} (in use?); choose another port "
            "(server.port, --port or DYNAMIC_MOE_PORT; 0 picks a free one)"
        )
    closers: list[Any] = [regions.close]
    metrics_port = health_port = None
    door = None
    try:  # every port is bound before the routers load, so a clash fails fast
        if config.colocated.enabled:
            door = _colocated_door(config, chains, health, regions, admission, device, port)
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
    loop = asyncio.get_running_loop()

    def on_breaker_change(router: str, old: str, new: str) -> None:
        status = RouterStatus.DEGRADED if new != "CLOSED" else RouterStatus.SERVING
        detail = f"circuit breaker {new}" if new != "CLOSED" else ""
        loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(health.set_router(router, status, detail))
        )
        if metrics is not None:
            metrics.breaker_transition(router, old, new)

    pool: DevicePool | None = None
    try:
        release_thread = None
        if config.server.event_loop_cpu is not None:
            pinned = pin_event_loop(config.server.event_loop_cpu)
            closers.append(pinned.restore)
            release_thread = pinned.release_thread  # threads the loop starts get every CPU
            loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="asyncio",
                                                         initializer=release_thread))
        # Workers start on demand up to server.max_workers (all at once with
        # optimization.enable_autoscaling off); the in-process optimized router uses it too.
        pool = DevicePool(  # more threads than cores only contend for the GIL and the cores
            max_workers=min(config.server.max_workers, os.cpu_count() or 1),
            autoscale=config.optimization.enable_autoscaling,
            name="device",
            initializer=release_thread,
        )
        hosted = await asyncio.to_thread(load_routers, config)
        await asyncio.to_thread(warm_up, hosted)
    except BaseException:  # nothing is served yet: release what was started and bound
        await server.stop(0)
        if pool is not None:
            pool.shutdown(wait=False)
        for close in closers:
            close()
        raise
    shared_limit = None  # one rate-limit bucket per caller across every router
    for name, router in hosted.items():
        chains[name] = build_chain(
            router, config, pool, metrics, on_breaker_change,
            rate_limit_shared_with=shared_limit, calls_reading=admission.reading,
        )
        shared_limit = shared_limit or chains[name].rate_limit
    running = RunningServer(
        config, server, port, health, chains, pool, registry, admission, metrics_port,
        health_port, closers, colocated=door,
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
    admission: Admission,
    device: Any,
    port: int,
) -> CoLocatedDoor:
    """The co-located door on ``colocated.socket_path`` (default: by the gRPC port)."""
    configured = config.colocated.socket_path
    path = configured if configured is not None else default_socket_path(port, os.geteuid())
    keys = config.security.api_keys if config.security.api_key_required else ()
    return CoLocatedDoor(
        chains, health, regions, socket_path=Path(path), default_directory=configured is None,
        api_keys=keys, device=device, version=__version__, admission=admission,
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


class _CapturedLog:
    """What gRPC core wrote to stderr while captured; ``keep``: write it back after."""

    def __init__(self) -> None:
        self.text = ""
        self.keep = True


@contextlib.contextmanager
def _core_log_captured() -> Iterator[_CapturedLog]:
    """Capture file descriptor 2 (gRPC core logs there, past Python) while binding the
    port: a taken port then prints only our one line, and a bound one loses nothing."""
    captured = _CapturedLog()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")
    if captured.keep and captured.text:
        sys.stderr.write(captured.text)
        sys.stderr.flush()


async def _watch_alerts(chains: dict[str, HostedRouterChain], alerts: AlertMonitor) -> None:
    """Judge every router's figures against the alert thresholds every few seconds."""
    while True:
        for name, chain in chains.items():
            alerts.update(name, chain.alert_figures())
        await asyncio.sleep(ALERT_PERIOD_S)


_LINGER_S = 0.1  # after the drain: time for the last answers to leave the sockets


async def _serve(config: ServiceConfig, selector: BusyPollSelector) -> None:
    running = await create_server(config)
    log.info("froze %d objects of the loaded server out of the cyclic collector's scans",
             _freeze_loaded_heap())
    chains = running.chains.values()
    selector.may_spin = lambda: not any(c.executor.passes_in_pool for c in chains)
    if running.metrics_port is not None:
        print(f"metrics on http://{config.metrics.host}:{running.metrics_port}/metrics", flush=True)
    if running.health_port is not None:
        print(f"health on http://{config.health.host}:{running.health_port}/readyz", flush=True)
    if running.colocated is not None:
        print(f"co-located door on unix:{running.colocated.socket_path}", flush=True)
    # Last: scripts and tests wait for this line, and the lines above are out by then.
    print(f"listening on {config.server.host}:{running.port}", flush=True)
    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    await signals.get()
    s = config.server
    log.info(
        "draining: NOT_SERVING, serving %.1fs more, then in-flight calls get %.1fs",
        s.drain_delay_s, s.drain_grace_s,
    )
    drain = asyncio.ensure_future(running.drain())
    second = asyncio.ensure_future(signals.get())  # a second signal ends the wait
    await asyncio.wait((drain, second), return_when=asyncio.FIRST_COMPLETED)
    if drain.done():
        second.cancel()
        figures = drain.result()
        await asyncio.sleep(_LINGER_S)
        log.info(
            "drained: %s (%.2fs serving while NOT_SERVING, %.2fs waiting); exiting",
            "every call answered" if figures.answered_all else "calls still held at the grace",
            figures.delay_s, figures.wait_s,
        )
    else:
        log.warning("second signal: exiting without waiting for the calls held")
    running.release()  # a socket file or a mapping must not outlive the process
    _exit(0)


def _freeze_loaded_heap() -> int:
    """Move every object alive now (a loaded server: its modules, config, routers, gRPC
    and torch, about 190,000 objects) out of the cyclic collector's full scans, and return
    how many. They live as long as the process, and reference counting still frees any
    that go. Measured at 16 callers of 1 token: one full collection in 9 s scanned them
    all and held the event loop for 131 ms; after the freeze none ran in the same time.
    Done by ``serve`` (the process's owner), not by :func:`create_server`, which tests
    and embedders call in processes of their own."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _exit(status: int) -> None:
    """Flush the logs and leave the process at once (module docstring: no core shutdown,
    no interpreter finalisation)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def serve(config: ServiceConfig) -> int:
    """Run the server until SIGTERM or SIGINT, drain, and exit the process with status 0
    (see the module docstring for why it exits without grpc core's shutdown)."""
    logging.basicConfig(
        level=config.server.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    selector = BusyPollSelector(config.server.busy_poll_us / 1e6)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        runner.run(_serve(config, selector))
    return 0  # not reached: _serve exits the process
