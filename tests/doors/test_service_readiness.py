"""Route refuses with UNAVAILABLE (DrainingError) until the routers have loaded and once
admission closes for the drain, instead of answering NOT_FOUND for routers not loaded yet;
between NOT_SERVING and the refusals (``drain_delay_s``) it still serves."""

from __future__ import annotations

import asyncio

import pytest

from moe_router.doors.admission import Admission
from moe_router.doors.health import HealthState
from moe_router.doors.request_wire import parse_route_request
from moe_router.doors.v1_service import RouterService
from moe_router.errors import DrainingError, NotFoundError
from moe_router.status_mapping import status_code_for
from moe_router_client.v1 import router_pb2 as pb

REQUEST = parse_route_request(pb.RouteRequest(router="mixtral").SerializeToString())


def test_route_is_unavailable_while_loading_served_while_not_serving_refused_once_closed():
    async def scenario() -> None:
        health = HealthState(["mixtral"])
        admission = Admission(4, 1 << 20)
        service = RouterService({}, health, device="cpu", version="test", admission=admission)
        with pytest.raises(DrainingError, match="loading its routers") as loading:
            await service._admitted_route(REQUEST, None, "r1")  # type: ignore[arg-type]
        assert status_code_for(loading.value).name == "UNAVAILABLE"
        await health.mark_ready()
        await health.mark_draining()
        assert not health.ready  # NOT_SERVING published ...
        with pytest.raises(NotFoundError):  # ... but the call is still routed
            await service._admitted_route(REQUEST, None, "r2")  # type: ignore[arg-type]
        admission.close()
        with pytest.raises(DrainingError, match="draining for shutdown") as draining:
            await service._admitted_route(REQUEST, None, "r3")  # type: ignore[arg-type]
        assert status_code_for(draining.value).name == "UNAVAILABLE"
        assert admission.stats().calls == 0

    asyncio.run(scenario())
