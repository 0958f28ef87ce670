"""gRPC handlers of moe_router.v1.RouterService: decode -> backend chain -> encode. Thin.

Proto <-> domain conversion lives in named functions (``request_to_call``,
``result_to_response``; a router's Stats and ListRouters entries come from its
``HostedRouterChain``); errors become status codes in one place
(``moe_router.doors.status_mapping``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
import torch
from grpc_status import rpc_status

from moe_router.chain.alerts import AlertMonitor
from moe_router.chain.backend import RouteCall, RouteOptions, RouteResult
from moe_router.errors import DrainingError, DynamicMoEError, NotFoundError, ValidationError
from moe_router.doors.health import HealthState, RouterStatus
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.request_wire import RouteRequestView, TensorView, parse_route_request
from moe_router.doors.security import caller_identity
from moe_router.doors.status_mapping import to_status
from moe_router_client.tensors import TensorCodecError, from_parts, to_wire
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

__all__ = ["RouterService", "add_router_service", "request_to_call", "result_to_response"]

log = logging.getLogger("moe_router.doors.v1_service")

_EXTRA_INPUTS = ("attention_weights", "logits", "gradients")
_STREAM_WINDOW = 8  # RouteStream requests in flight at once; answers still go out in order
_SERVING = {
    RouterStatus.SERVING: pb.SERVING,
    RouterStatus.NOT_SERVING: pb.NOT_SERVING,
    RouterStatus.DEGRADED: pb.DEGRADED,
}


def peer_host(peer: str) -> str:
    """The caller's address without its port (``ipv4:127.0.0.1:5123`` -> ``ipv4:127.0.0.1``),
    so a caller without a key keeps one rate-limit bucket across connections."""
    head, sep, tail = peer.rpartition(":")
    return head if sep and tail.isdigit() else peer


def _decode(tensor: TensorView, field: str) -> torch.Tensor:
    try:
        return from_parts(tensor.dtype, tensor.shape, tensor.data, as_torch=True)
    except TensorCodecError as exc:
        raise ValidationError(f"{field}: {exc}") from exc


def request_to_call(
    request: RouteRequestView,
    chains: Mapping[str, HostedRouterChain],
    context: grpc.aio.ServicerContext,
) -> RouteCall:
    """Decode a RouteRequest into a RouteCall; tensors stay views of the received bytes."""
    if request.error:
        raise ValidationError(request.error)
    message = request.message
    if not message.router:
        raise ValidationError(f"router: required; this server hosts {sorted(chains)}")
    if message.router not in chains:
        raise NotFoundError(
            f"unknown router '{message.router}'; this server hosts {sorted(chains)}"
        )
    if "hidden_states" not in request.tensors:
        raise ValidationError(
            "hidden_states: required, a [tokens, dim] or [batch, seq, dim] tensor"
        )
    extra = {
        name: _decode(request.tensors[name], name)
        for name in _EXTRA_INPUTS
        if name in request.tensors
    }
    remaining = context.time_remaining()
    return RouteCall(
        router=message.router,
        layer=message.layer,
        hidden_states=_decode(request.tensors["hidden_states"], "hidden_states"),
        options=RouteOptions(
            return_router_logits=message.return_router_logits,
            skip_cache=message.skip_cache,
            seed=message.seed if message.HasField("seed") else None,
            extra_inputs=extra,
        ),
        deadline=None if remaining is None else time.monotonic() + remaining,
        request_id=message.request_id or uuid.uuid4().hex[:16],
        peer=caller_identity() or peer_host(context.peer()),
    )


def result_to_response(result: RouteResult, call: RouteCall) -> pb.RouteResponse:
    """Encode a RouteResult; optional tensors only when present or asked for."""
    out = result.output
    response = pb.RouteResponse(
        expert_indices=to_wire(out.expert_indices),
        expert_weights=to_wire(out.expert_weights),
        num_experts_per_token=to_wire(out.num_experts_per_token),
        info=pb.RoutingInfo(
            tokens_per_expert=out.tokens_per_expert.tolist(),
            dropped_tokens=out.dropped_tokens,
            router_version=result.router_version,
            cache_hit=result.cache_hit,
            batch_requests=result.batch_requests,
            batch_tokens=result.batch_tokens,
            queue_time_us=result.queue_time_us,
            compute_time_us=result.compute_time_us,
            request_id=call.request_id,
            layer=call.layer,
        ),
    )
    if out.aux_loss is not None:
        response.info.aux_loss = float(out.aux_loss)
    if out.z_loss is not None:
        response.info.z_loss = float(out.z_loss)
    if out.complexity_scores is not None:
        response.complexity_scores.CopyFrom(to_wire(out.complexity_scores.float()))
    if call.options.return_router_logits:
        response.router_logits.CopyFrom(to_wire(out.router_logits.float()))
    if out.dispatch_weights is not None:
        response.dispatch_weights.CopyFrom(to_wire(out.dispatch_weights.float()))
    if out.combine_weights is not None:
        response.combine_weights.CopyFrom(to_wire(out.combine_weights.float()))
    return response


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
            return pb.StatsResponse(routers=[self.chains[n].stats_proto() for n in names])
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
                f"alert {check} {state['value']:.4g} > {state['threshold']:.4g}"
                for check, state in sorted(failing.items())
            )
        return pb.RouterHealth(router=name, status=_SERVING[status], detail=detail)

    async def ListRouters(  # noqa: N802
        self, request: pb.ListRoutersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRoutersResponse:
        return pb.ListRoutersResponse(
            routers=[self.chains[name].describe() for name in sorted(self.chains)]
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
