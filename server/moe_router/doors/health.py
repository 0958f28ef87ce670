"""Serving status of the server and of each router, published three ways.

The moe_router.v1 Health RPC (SERVING / NOT_SERVING / DEGRADED per router), the
standard grpc.health.v1 service (overall name "" and one service name per router, so
Kubernetes gRPC probes and stock tools work), and a plain HTTP ``/healthz`` (live)
and ``/readyz`` (ready) for HTTP probes. One sick router marks only its own
grpc.health.v1 name NOT_SERVING, never the overall one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from moe_router.doors.method_registration import add_method_handlers
from moe_router.doors.rpc_errors import lenient_handler

__all__ = [
    "ClosableHealthServicer",
    "add_health_service",
    "HealthState",
    "ROUTER_SERVICE_PREFIX",
    "RouterStatus",
    "start_http_health_server",
]

ROUTER_SERVICE_PREFIX = "moe_router.v1.RouterService/"
_OVERALL = ("", "moe_router.v1.RouterService")


class RouterStatus(enum.Enum):
    """A router's serving status (mirrors the proto's ServingStatus)."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DEGRADED = "DEGRADED"


class ClosableHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams end (status OK) once :meth:`close_watches` is
    called. grpcio's servicer keeps every Watch open until the server's grace runs out,
    so one watching client held a drained server for the whole ``drain_grace_s`` and its
    cancellation was logged as a traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.Event()

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 (gRPC's name)
        if self._closed.is_set():
            return
        watch = asyncio.ensure_future(super().Watch(request, context))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((watch, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, closed):
                task.cancel()
            await asyncio.gather(watch, closed, return_exceptions=True)

    def close_watches(self) -> None:
        """End every open Watch and answer new ones at once (shutdown)."""
        self._closed.set()


def add_health_service(servicer: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    """Register grpc.health.v1 like grpcio's adder, answering undecodable requests
    INVALID_ARGUMENT instead of UNKNOWN (:func:`rpc_errors.lenient_handler`)."""
    request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request.FromString, response.SerializeToString
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, request.FromString, response.SerializeToString
        ),
    }
    handlers = {name: lenient_handler(h, request.DESCRIPTOR.name) for name, h in handlers.items()}
    service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    add_method_handlers(server, service, handlers)


class HealthState:
    """Owns every status and pushes changes to the grpc.health.v1 servicer."""

    def __init__(self, routers: list[str]) -> None:
        self.servicer = ClosableHealthServicer()
        self._lock = threading.Lock()
        self._ready = False
        self._draining = False
        self._routers: dict[str, tuple[RouterStatus, str]] = {
            name: (RouterStatus.NOT_SERVING, "loading") for name in routers
        }

    @staticmethod
    def service_name(router: str) -> str:
        """The grpc.health.v1 service name of one router."""
        return ROUTER_SERVICE_PREFIX + router

    async def publish(self) -> None:
        """Write the current statuses to the grpc.health.v1 servicer."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self.ready else not_serving
        for name in _OVERALL:
            await self.servicer.set(name, overall)
        for router, (status, _) in self.routers().items():
            ok = self.ready and status is RouterStatus.SERVING
            await self.servicer.set(self.service_name(router), serving if ok else not_serving)

    async def mark_ready(self) -> None:
        """All routers loaded: everything SERVING."""
        with self._lock:
            self._ready = True
            for name in self._routers:
                self._routers[name] = (RouterStatus.SERVING, "")
        await self.publish()

    async def mark_draining(self) -> None:
        """Shutdown began: every name NOT_SERVING, before in-flight calls finish."""
        with self._lock:
            self._draining = True
        await self.publish()
        await self.servicer.enter_graceful_shutdown()

    async def set_router(self, router: str, status: RouterStatus, detail: str = "") -> None:
        """Change one router's status (e.g. DEGRADED while its breaker is open)."""
        with self._lock:
            self._routers[router] = (status, detail)
        if not self._draining:
            await self.publish()

    @property
    def ready(self) -> bool:
        """True once loaded and until draining starts."""
        return self._ready and not self._draining

    @property
    def loaded(self) -> bool:
        """True once every router has loaded (also while draining)."""
        return self._ready

    @property
    def draining(self) -> bool:
        """True once shutdown began."""
        return self._draining

    def routers(self) -> dict[str, tuple[RouterStatus, str]]:
        """Each router's (status, detail)."""
        with self._lock:
            return dict(self._routers)

    def overall(self) -> RouterStatus:
        """NOT_SERVING until ready; DEGRADED while any router is not SERVING."""
        if not self.ready:
            return RouterStatus.NOT_SERVING
        statuses = {status for status, _ in self.routers().values()}
        return RouterStatus.SERVING if statuses <= {RouterStatus.SERVING} else RouterStatus.DEGRADED


def start_http_health_server(
    state: HealthState, host: str, port: int
) -> tuple[ThreadingHTTPServer, threading.Thread, int]:
    """Serve ``/healthz`` (200 while the process lives) and ``/readyz`` (200 when ready)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.startswith("/healthz"):
                code = 200
            elif self.path.startswith("/readyz"):
                code = 200 if state.ready else 503
            else:
                self.send_error(404, "expected /healthz or /readyz")
                return
            body = json.dumps(
                {
                    "status": state.overall().value,
                    "routers": {name: s.value for name, (s, _) in state.routers().items()},
                }
            ).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="http-health", daemon=True)
    thread.start()
    return server, thread, server.server_address[1]
