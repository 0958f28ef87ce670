"""gRPC handlers of moe_router.v1.RouterService: decode -> backend chain -> encode. Thin.

Proto <-> domain conversion lives in :mod:`moe_router.doors.v1_convert`; errors become
status codes in one place (``moe_router.status_mapping``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from grpc_status import rpc_status

from moe_router.chain.alerts import AlertMonitor
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.health import HealthState, RouterStatus
from moe_router.doors.request_wire import RouteRequestView, parse_route_request
from moe_router.doors.v1_convert import (
    describe_router,
    request_to_call,
    result_to_response,
    router_stats,
)
from moe_router.errors import DrainingError, DynamicMoEError, NotFoundError
from moe_router.status_mapping import to_status
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

__all__ = ["RouterService", "add_router_service"]

log = logging.getLogger("moe_router.doors.v1_service")

_STREAM_WINDOW = 8  # RouteStream requests in flight at once; answers still go out in order
_SERVING = {
    RouterStatus.SERVING: pb.SERVING,
    RouterStatus.NOT_SERVING: pb.NOT_SERVING,
    RouterStatus.DEGRADED: pb.DEGRADED,
}


async def abort_with_error(
    context: grpc.aio.ServicerContext, exc: BaseException, request_id: str = ""
) -> None:
    """Answer ``exc`` with its status code, message and rich details; log the unexpected."""
    if not isinstance(exc, DynamicMoEError):
        log.exception("internal error (request id %s)", request_id or "-", exc_info=exc)
    await context.abort_with_status(rpc_status.to_status(to_status(exc, request_id)))


class RouterService(pb_grpc.RouterServiceServicer):
    """The moe_router.v1.RouterService handlers over each router's backend chain."""

    def __init__(
        self,
        chains: Mapping[str, HostedRouterChain],
        health: HealthState,
        *,
        device: str,
        version: str,
        alerts: AlertMonitor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chains = chains
        self.health = health
        self.alerts = alerts
        self.device = device
        self.version = version
        self._clock = clock
        self._started = clock()

    async def _route(
        self, request: RouteRequestView, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        if not self.health.ready:  # still loading routers, or draining for shutdown
            state = "draining for shutdown" if self.health.draining else "loading its routers"
            raise DrainingError(
                f"server is {state}; retry shortly or on another replica",
                retry_after_s=1.0,
                reason="DRAINING",
            )
        call = request_to_call(request, self.chains, context)
        result = await self.chains[call.router].chain.route(call)
        return result_to_response(result, call)

    async def Route(
        self, request: RouteRequestView, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:  # noqa: N802
        try:
            return await self._route(request, context)
        except Exception as exc:  # mapped to a status, never kills the server
            await abort_with_error(context, exc, request.message.request_id)
            raise  # unreachable: abort raises

    async def RouteStream(  # noqa: N802
        self, request_iterator: AsyncIterator[RouteRequestView], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RouteResponse]:
        pending: asyncio.Queue[asyncio.Task[pb.RouteResponse] | None] = asyncio.Queue(
            _STREAM_WINDOW
        )

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._route(request, context)))
            finally:
                await pending.put(None)

        feeder = asyncio.ensure_future(feed())
        try:
            while (task := await pending.get()) is not None:
                try:
                    yield await task
                except Exception as exc:
                    await abort_with_error(context, exc)
            await feeder
        finally:
            feeder.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:  # noqa: N802
        try:
            names = [request.router] if request.router else sorted(self.chains)
            for name in names:
                if name not in self.chains:
                    raise NotFoundError(
                        f"unknown router '{name}'; this server hosts {sorted(self.chains)}"
                    )
            return pb.StatsResponse(
                routers=[router_stats(self.chains[n].figures()) for n in names]
            )
        except Exception as exc:
            await abort_with_error(context, exc)
            raise

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:  # noqa: N802
        routers = [
            self._router_health(name, status, detail)
            for name, (status, detail) in sorted(self.health.routers().items())
        ]
        overall = self.health.overall()
        if overall is RouterStatus.SERVING and any(r.status != pb.SERVING for r in routers):
            overall = RouterStatus.DEGRADED
        return pb.HealthResponse(
            status=_SERVING[overall],
            routers=routers,
            device=self.device,
            version=self.version,
            uptime_s=self._clock() - self._started,
        )

    def _router_health(self, name: str, status: RouterStatus, detail: str) -> pb.RouterHealth:
        """A serving router with a firing alert is DEGRADED, the alerts in its detail."""
        failing = self.alerts.failing(name) if self.alerts is not None else {}
        if status is RouterStatus.SERVING and failing:
            status = RouterStatus.DEGRADED
            detail = "; ".join(
                f"alert {name} {check.value:.4g} > {check.threshold:.4g}"
                for name, check in sorted(failing.items())
            )
        return pb.RouterHealth(router=name, status=_SERVING[status], detail=detail)

    async def ListRouters(  # noqa: N802
        self, request: pb.ListRoutersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRoutersResponse:
        return pb.ListRoutersResponse(
            routers=[describe_router(self.chains[name]) for name in sorted(self.chains)]
        )


def add_router_service(service: RouterService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated adder does, except that Route and
    RouteStream receive raw requests decoded by :func:`parse_route_request` (zero-copy
    tensors)."""
    serialize = pb.RouteResponse.SerializeToString
    handlers = {
        "Route": grpc.unary_unary_rpc_method_handler(
            service.Route,
            request_deserializer=parse_route_request,
            response_serializer=serialize,
        ),
        "RouteStream": grpc.stream_stream_rpc_method_handler(
            service.RouteStream,
            request_deserializer=parse_route_request,
            response_serializer=serialize,
        ),
    }
    for name, request_type, response_type in (
        ("Stats", pb.StatsRequest, pb.StatsResponse),
        ("Health", pb.HealthRequest, pb.HealthResponse),
        ("ListRouters", pb.ListRoutersRequest, pb.ListRoutersResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    service_name = pb.DESCRIPTOR.services_by_name["RouterService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)
