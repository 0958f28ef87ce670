"""gRPC handlers of moe_router.v1.RouterService: decode -> backend chain -> encode. Thin.

Proto <-> domain conversion lives in :mod:`moe_router.doors.v1_convert` (Route's answers
are written to their bytes by :mod:`moe_router.doors.response_wire`); errors become
status codes in one place (``moe_router.status_mapping``); admission control and the
drain in :mod:`moe_router.doors.admission`.

Route is registered as a *stream-unary* method (a unary call is one request message on
the wire either way): its handler starts before the message is read, so a call that
admission refuses is answered without its payload ever being read into memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from moe_router.chain.alerts import AlertMonitor
from moe_router.chain.backend import AfterAnswer
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.admission import Admission
from moe_router.doors.health import HealthState, RouterStatus
from moe_router.doors.method_registration import add_method_handlers
from moe_router.doors.request_wire import RouteRequestView, parse_route_request
from moe_router.doors.response_wire import encode_route_response
from moe_router.doors.rpc_errors import (
    Failure,
    abort_with_error,
    decoded,
    failure,
    lenient,
    new_request_id,
)
from moe_router.doors.v1_convert import (
    describe_router,
    request_id_of,
    request_to_call,
    router_stats,
)
from moe_router.errors import DrainingError, NotFoundError
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

__all__ = ["RouterService", "add_router_service"]

_STREAM_WINDOW = 8  # RouteStream requests in flight at once; answers still go out in order
_SERVING = {
    RouterStatus.SERVING: pb.SERVING,
    RouterStatus.NOT_SERVING: pb.NOT_SERVING,
    RouterStatus.DEGRADED: pb.DEGRADED,
}


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
        admission: Admission,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chains = chains
        self.health = health
        self.alerts = alerts
        self.admission = admission
        self.device = device
        self.version = version
        self._clock = clock
        self._started = clock()

    async def _route(
        self, request: RouteRequestView, context: grpc.aio.ServicerContext, request_id: str
    ) -> bytes:
        """A serialized RouteResponse (Route's handlers send it as it is).

        The chain's records of the call run once the handler has handed the answer to
        gRPC (``AfterAnswer``): scheduled on the loop now, they run after this turn of
        it, in which gRPC writes the answer (and before anything the caller sends next)."""
        if not self.health.loaded:
            raise DrainingError(
                "server is loading its routers; retry shortly or on another replica",
                retry_after_s=1.0,
                reason="DRAINING",
            )
        after = AfterAnswer()
        try:
            call = request_to_call(request, self.chains, context, request_id, after)
            result = await self.chains[call.router].chain.route(call)
            return encode_route_response(result, call)
        finally:
            asyncio.get_running_loop().call_soon(after.run)

    async def _admitted_route(
        self, request: RouteRequestView, context: grpc.aio.ServicerContext, request_id: str
    ) -> bytes | Failure:
        """One RouteStream message, held by admission like a Route call."""
        try:
            with self.admission.enter() as ticket:
                self.admission.add_bytes(ticket, request.nbytes)
                return await self._route(request, context, request_id)
        except Exception as exc:  # answered by the stream, never kills the server
            return failure(exc, request_id)

    async def _route_call(self, context: grpc.aio.ServicerContext) -> bytes | Failure:
        request_id = ""
        try:
            ticket, request = await self.admission.read_admitted(context, "Route")
            request_id = request_id_of(request) or new_request_id()
            self.admission.add_bytes(ticket, request.nbytes)
            return await self._route(request, context, request_id)
        except Exception as exc:  # mapped to a status, never kills the server
            return failure(exc, request_id or new_request_id())

    async def Route(  # noqa: N802
        self, requests: AsyncIterator[RouteRequestView], context: grpc.aio.ServicerContext
    ) -> bytes:
        """Admit the call, then read its one message and route it (see module docstring).
        A failure is answered from this frame, which holds no request (:func:`failure`)."""
        outcome = await self._route_call(context)
        if isinstance(outcome, Failure):
            await abort_with_error(context, outcome)
        return outcome  # type: ignore[return-value]  # abort raised for a Failure

    async def RouteStream(  # noqa: N802
        self, request_iterator: AsyncIterator[RouteRequestView], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        pending: asyncio.Queue[asyncio.Task[bytes | Failure] | None] = (
            asyncio.Queue(_STREAM_WINDOW)
        )

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    request_id = request_id_of(request) or new_request_id()
                    await pending.put(
                        asyncio.ensure_future(self._admitted_route(request, context, request_id))
                    )
            finally:
                await pending.put(None)

        feeder = asyncio.ensure_future(feed())
        try:
            while (task := await pending.get()) is not None:
                outcome = await task
                if isinstance(outcome, Failure):
                    await abort_with_error(context, outcome)  # raises: ends the stream
                    return
                yield outcome
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
            request = decoded(request)
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
            await abort_with_error(context, failure(exc, new_request_id()))
            raise

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:  # noqa: N802
        try:
            decoded(request)
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
        except Exception as exc:
            await abort_with_error(context, failure(exc, new_request_id()))
            raise

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
        try:
            decoded(request)
            return pb.ListRoutersResponse(
                routers=[describe_router(self.chains[name]) for name in sorted(self.chains)]
            )
        except Exception as exc:
            await abort_with_error(context, failure(exc, new_request_id()))
            raise


def add_router_service(service: RouterService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated adder does, except that Route and
    RouteStream receive raw requests decoded by :func:`parse_route_request` (zero-copy
    tensors) and answer bytes already serialized (:func:`encode_route_response`), Route
    runs as a stream-unary handler (admitted before its message is read, module
    docstring), and the other methods answer undecodable bytes INVALID_ARGUMENT."""
    handlers = {
        "Route": grpc.stream_unary_rpc_method_handler(
            service.Route, request_deserializer=parse_route_request,
        ),
        "RouteStream": grpc.stream_stream_rpc_method_handler(
            service.RouteStream, request_deserializer=parse_route_request,
        ),
    }
    for name, request_type, response_type in (
        ("Stats", pb.StatsRequest, pb.StatsResponse),
        ("Health", pb.HealthRequest, pb.HealthResponse),
        ("ListRouters", pb.ListRoutersRequest, pb.ListRoutersResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=lenient(request_type.FromString, request_type.DESCRIPTOR.name),
            response_serializer=response_type.SerializeToString,
        )
    add_method_handlers(server, pb.DESCRIPTOR.services_by_name["RouterService"].full_name,
                        handlers)
