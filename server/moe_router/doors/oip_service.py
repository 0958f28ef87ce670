"""gRPC handlers of the Open Inference Protocol (``inference.GRPCInferenceService``,
KServe v2 with Triton's statistics and system shared-memory extensions): decode -> the
router's chain -> encode, as the moe_router.v1 door does. Thin.

A ModelInfer decodes (``oip_convert.request_to_call``) into the same ``RouteCall`` a Route
call makes and goes through ``chains[router].chain.route(call)``: the same cache, metrics,
rate limit, breaker and batching, and the same bits back. Errors take the status codes
of the one table (``status_mapping``): bad input INVALID_ARGUMENT, unknown model
NOT_FOUND, not ready UNAVAILABLE; ModelStreamInfer answers a failed request in-band
(``error_message``) and the stream goes on, as Triton does. The API-key interceptor of
the server covers these methods like every other (ServerLive and ServerReady are exempt,
as probes). Inference calls are admitted and held by the server's admission control as
Route calls are (:mod:`moe_router.doors.admission`): the same bounds and refusals,
served through ``server.drain_delay_s`` and answered before a drained server exits.
ModelInfer runs as a stream-unary handler for that, as Route does (the same bytes on
the wire), so the batcher also sees the calls being read and lets them share a pass
(16 closed-loop tritonclient callers of 1-token DeepSeek-V3: 1.0 -> 2.7 calls a pass).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping

import grpc
from google.protobuf import descriptor_pool

from moe_router.chain.backend import AfterAnswer
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.admission import Admission
from moe_router.doors.health import HealthState, RouterStatus
from moe_router.doors.method_registration import add_method_handlers
from moe_router.doors.oip_convert import (
    InferRequestView,
    model_statistics,
    parse_infer_request,
    request_to_call,
    result_to_response,
)
from moe_router.doors.oip_models import model_metadata, resolve_model
from moe_router.doors.rpc_errors import Failure, abort_with_error, failure, new_request_id
from moe_router.doors.security import caller_identity
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.doors.v1_convert import peer_host
from moe_router.errors import DrainingError, DynamicMoEError, NotFoundError
from moe_router.status_mapping import to_status
from moe_router_client.inference import grpc_service_pb2 as oip

__all__ = ["OIP_SERVICE_NAME", "OipService", "add_oip_service", "reflection_pool"]

log = logging.getLogger("moe_router.doors.oip_service")

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("parameters", "statistics", "system_shared_memory")
_STREAM_WINDOW = 8  # ModelStreamInfer requests in flight at once; answers keep their order


class OipService:
    """The GRPCInferenceService handlers over each router's chain and one region registry."""

    def __init__(
        self,
        chains: Mapping[str, HostedRouterChain],
        health: HealthState,
        regions: SharedMemoryRegistry,
        *,
        version: str,
        admission: Admission,
    ) -> None:
        self.chains = chains
        self.health = health
        self.regions = regions
        self.version = version
        self.admission = admission

    # ------------------------------------------------------------------ health, metadata
    async def ServerLive(  # noqa: N802
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.health.ready)

    async def ModelReady(  # noqa: N802
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        """Ready when loaded, SERVING, and the version (if given) is one it serves; an
        unknown model is not ready (Triton answers the same, without an error)."""
        if not self.health.ready:
            return oip.ModelReadyResponse(ready=False)
        try:
            ref = resolve_model(request.name, self.chains)
        except DynamicMoEError:
            return oip.ModelReadyResponse(ready=False)
        status, _ = self.health.routers().get(ref.router, (RouterStatus.NOT_SERVING, ""))
        versions = self.chains[ref.router].hosted.versions
        if ref.layer is not None:
            versions = versions[ref.layer : ref.layer + 1]
        version_ok = not request.version or request.version in versions
        return oip.ModelReadyResponse(ready=status is RouterStatus.SERVING and version_ok)

    async def ServerMetadata(  # noqa: N802
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="moe-router", version=self.version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(  # noqa: N802
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        try:
            self._check_loaded()
            ref = resolve_model(request.name, self.chains)
            chain = self.chains[ref.router]
            if request.version and request.version not in chain.hosted.versions:
                raise NotFoundError(
                    f"model '{request.name}' has no version '{request.version[:100]}'"
                )
            return model_metadata(request.name, ref, chain)
        except Exception as exc:
            await abort_with_error(context, failure(exc, new_request_id()))
            raise

    # ------------------------------------------------------------------ inference
    def _check_loaded(self) -> None:
        """Inference is served once the routers are loaded, through the drain delay too;
        the drain's refusals come from admission (as Route's)."""
        if not self.health.loaded:
            raise DrainingError(
                "server is loading its routers; retry shortly or on another replica",
                retry_after_s=1.0,
                reason="DRAINING",
            )

    async def _infer(
        self, request: InferRequestView, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        self._check_loaded()
        owner = caller_identity()
        after = AfterAnswer()  # the chain's records run once the answer is out (Route's)
        try:
            call, outputs = request_to_call(
                request, self.chains, self.regions,
                owner=owner,
                peer=owner or peer_host(context.peer()),
                time_remaining=context.time_remaining(),
                after_answer=after,
            )
            result = await self.chains[call.router].chain.route(call)
            return result_to_response(
                result, call, request.message, outputs, self.regions, owner)
        finally:
            asyncio.get_running_loop().call_soon(after.run)

    async def _admitted_infer(
        self, request: InferRequestView, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        """One ModelStreamInfer message, held by admission like a ModelInfer call."""
        with self.admission.enter() as ticket:
            self.admission.add_bytes(ticket, request.nbytes)
            return await self._infer(request, context)

    async def _infer_call(
        self, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse | Failure:
        request_id = ""
        try:
            ticket, request = await self.admission.read_admitted(context, "ModelInfer")
            request_id = request.message.id
            self.admission.add_bytes(ticket, request.nbytes)
            return await self._infer(request, context)
        except Exception as exc:  # mapped to a status, never kills the server
            return failure(exc, request_id or new_request_id())

    async def ModelInfer(  # noqa: N802
        self, requests: AsyncIterator[InferRequestView], context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        """Admit the call, then read its one message and route it; a failure is answered
        from this frame, which holds no request."""
        outcome = await self._infer_call(context)
        if isinstance(outcome, Failure):
            await abort_with_error(context, outcome)
        return outcome  # type: ignore[return-value]  # abort raised for a Failure

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[InferRequestView], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        pending: asyncio.Queue[tuple[str, asyncio.Task[oip.ModelInferResponse]] | None] = (
            asyncio.Queue(_STREAM_WINDOW)
        )

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._admitted_infer(request, context))
                    await pending.put((request.message.id, task))
            finally:
                await pending.put(None)

        feeder = asyncio.ensure_future(feed())
        try:
            while (item := await pending.get()) is not None:
                request_id, task = item
                try:
                    yield oip.ModelStreamInferResponse(infer_response=await task)
                except Exception as exc:  # in-band, as Triton: the stream carries on
                    if not isinstance(exc, DynamicMoEError):
                        log.exception("internal error (request id %s)", request_id or "-")
                    message = to_status(exc, request_id).message
                    yield oip.ModelStreamInferResponse(
                        error_message=message,
                        infer_response=oip.ModelInferResponse(id=request_id),
                    )
            await feeder
        finally:
            feeder.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if item is not None:
                    item[1].cancel()

    async def ModelStatistics(  # noqa: N802
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        try:
            if request.name:
                names = [resolve_model(request.name, self.chains).router]
            else:
                names = sorted(self.chains)
            return oip.ModelStatisticsResponse(
                model_stats=[model_statistics(n, self.chains[n]) for n in names]
            )
        except Exception as exc:
            await abort_with_error(context, failure(exc, new_request_id()))
            raise

    # ------------------------------------------------------------------ shared memory
    async def SystemSharedMemoryStatus(  # noqa: N802
        self, request: oip.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> oip.SystemSharedMemoryStatusResponse:
        try:
            response = oip.SystemSharedMemoryStatusResponse()
            for region in self.regions.status(request.name, owner=caller_identity()):
                response.regions[region.name].CopyFrom(
                    oip.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=region.name, key=region.key, offset=region.offset,
                        byte_size=region.byte_size,
                    )
                )
            return response
        except Exception as exc:
            await abort_with_error(context, failure(exc, new_request_id()))
            raise

    async def SystemSharedMemoryRegister(  # noqa: N802
        self, request: oip.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> oip.SystemSharedMemoryRegisterResponse:
        try:
            self.regions.register(request.name, request.key, request.offset, request.byte_size,
                                  owner=caller_identity())
            return oip.SystemSharedMemoryRegisterResponse()
        except Exception as exc:
            await abort_with_error(context, failure(exc, new_request_id()))
            raise

    async def SystemSharedMemoryUnregister(  # noqa: N802
        self, request: oip.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> oip.SystemSharedMemoryUnregisterResponse:
        self.regions.unregister(request.name, owner=caller_identity())
        return oip.SystemSharedMemoryUnregisterResponse()


def add_oip_service(
    chains: Mapping[str, HostedRouterChain],
    health: HealthState,
    server: grpc.aio.Server,
    *,
    version: str,
    admission: Admission,
    regions: SharedMemoryRegistry | None = None,
) -> OipService:
    """Register the GRPCInferenceService on ``server`` over ``chains`` (filled as routers
    load) and return it; ``regions`` is the registry to share (a new one by default).

    ModelInfer and ModelStreamInfer receive raw requests decoded by
    :func:`parse_infer_request` (tensor payloads are views of the received bytes);
    ``admission``: the server's, which the other doors share.
    """
    service = OipService(
        chains, health, regions if regions is not None else SharedMemoryRegistry(),
        version=version, admission=admission,
    )
    methods = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    infer_serializer = oip.ModelInferResponse.SerializeToString
    handlers = {
        "ModelInfer": grpc.stream_unary_rpc_method_handler(
            service.ModelInfer, request_deserializer=parse_infer_request,
            response_serializer=infer_serializer,
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            service.ModelStreamInfer, request_deserializer=parse_infer_request,
            response_serializer=oip.ModelStreamInferResponse.SerializeToString,
        ),
    }
    for name, method in methods.items():
        if name in handlers:
            continue
        request_type = getattr(oip, method.input_type.name)
        response_type = getattr(oip, method.output_type.name)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    add_method_handlers(server, OIP_SERVICE_NAME, handlers)
    return service


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """One descriptor pool holding the file of every named service, for server
    reflection: the OIP file lives in a pool of its own (``moe_router_client.inference``
    says why), every other in protobuf's default pool."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: object) -> None:
        name = file.name  # type: ignore[attr-defined]
        if name in added:
            return
        for dependency in file.dependencies:  # type: ignore[attr-defined]
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)  # type: ignore[attr-defined]
        added.add(name)

    for service in service_names:
        source = oip.DESCRIPTOR.pool if service == OIP_SERVICE_NAME else descriptor_pool.Default()
        add(source.FindFileContainingSymbol(service))
    return pool
