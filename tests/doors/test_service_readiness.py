"""Route refuses with UNAVAILABLE (DrainingError) until the routers have loaded and
once draining starts, instead of answering NOT_FOUND for routers not loaded yet."""

from __future__ import annotations

import asyncio

import pytest

from moe_router.doors.health import HealthState
from moe_router.doors.request_wire import parse_route_request
from moe_router.doors.v1_service import RouterService
from moe_router.errors import DrainingError
from moe_router.status_mapping import status_code_for
from moe_router_client.v1 import router_pb2 as pb

REQUEST = parse_route_request(pb.RouteRequest(router="mixtral").SerializeToString())


def test_route_is_unavailable_while_loading_and_while_draining():
    async def scenario() -> None:
        health = HealthState(["mixtral"])
        service = RouterService({}, health, device="cpu", version="test")
        with pytest.raises(DrainingError, match="loading its routers") as loading:
            await service._route(REQUEST, None)  # type: ignore[arg-type]
        assert status_code_for(loading.value).name == "UNAVAILABLE"
        await health.mark_ready()
        await health.mark_draining()
        with pytest.raises(DrainingError, match="draining for shutdown"):
            await service._route(REQUEST, None)  # type: ignore[arg-type]

    asyncio.run(scenario())
