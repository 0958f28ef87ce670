"""Which methods gRPC core has registered: only the per-call ones, on a real in-process
server, and every other method still answered through the generic handlers."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import grpc
import grpc.aio._server as aio_server
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from moe_router.config import load_config
from moe_router.doors.method_registration import PER_CALL_METHODS, add_method_handlers
from moe_router.doors.server import create_server
from moe_router_client.inference import grpc_service_pb2 as oip
from moe_router_client.inference import grpc_service_pb2_grpc as oip_grpc
from moe_router_client.tensors import to_wire
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

CONFIG = """\
server: {host: 127.0.0.1, port: 0, device: cpu}
metrics: {enabled: false}
health: {enabled: false}
routers:
  - {name: a, kind: top_k, input_dim: 8, num_experts: 4, top_k: 2}
"""


def test_only_the_per_call_methods_are_registered_and_every_method_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: set[tuple[str, str]] = set()
    real = aio_server.Server.add_registered_method_handlers

    def spy(self, service: str, handlers: dict) -> None:  # type: ignore[no-untyped-def]
        registered.update((service, name) for name in handlers)
        real(self, service, handlers)

    monkeypatch.setattr(aio_server.Server, "add_registered_method_handlers", spy)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    config = load_config(path, env={})
    request = pb.RouteRequest(router="a", skip_cache=True)
    to_wire(np.ones((2, 8), np.float32), out=request.hidden_states)

    async def run() -> tuple:
        running = await create_server(config, registry=CollectorRegistry())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                v1 = pb_grpc.RouterServiceStub(channel)
                routed = await v1.Route(request)
                stats = await v1.Stats(pb.StatsRequest(router="a"))
                health = await v1.Health(pb.HealthRequest())
                listed = await v1.ListRouters(pb.ListRoutersRequest())
                inference = oip_grpc.GRPCInferenceServiceStub(channel)
                live = await inference.ServerLive(oip.ServerLiveRequest())
                metadata = await inference.ModelMetadata(oip.ModelMetadataRequest(name="a"))
                check = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest())
                reflected = [r async for r in
                             reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                                 iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        finally:
            await running.stop(0)
        return routed, stats, health, listed, live, metadata, check, reflected

    routed, stats, health, listed, live, metadata, check, reflected = asyncio.run(run())
    assert registered == {
        ("moe_router.v1.RouterService", "Route"),
        ("moe_router.v1.RouterService", "RouteStream"),
        ("inference.GRPCInferenceService", "ModelInfer"),
        ("inference.GRPCInferenceService", "ModelStreamInfer"),
    }
    assert {name for _, name in registered} == PER_CALL_METHODS
    assert routed.expert_indices.shape == [2, 2]
    assert stats.routers[0].requests == 1 and health.status == pb.SERVING
    assert [r.name for r in listed.routers] == ["a"]
    assert live.live and metadata.name == "a"
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    services = {s.name for s in reflected[0].list_services_response.service}
    assert {"moe_router.v1.RouterService", "inference.GRPCInferenceService"} <= services


def test_a_service_without_per_call_methods_registers_nothing() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.generic: list = []
            self.registered: list = []

        def add_generic_rpc_handlers(self, handlers: tuple) -> None:
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            self.registered.append((service, sorted(handlers)))

    def answer(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(answer)
    server = Recorder()
    add_method_handlers(server, "s.Quiet", {"Stats": handler})  # type: ignore[arg-type]
    add_method_handlers(server, "s.Busy", {"Route": handler, "Stats": handler},  # type: ignore[arg-type]
                        per_call={"Route"})
    assert len(server.generic) == 2  # every method is served through a generic handler
    assert server.registered == [("s.Busy", ["Route"])]
