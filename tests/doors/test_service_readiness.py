"""Route refuses with UNAVAILABLE (DrainingError) until the routers have loaded and once
admission closes for the drain, instead of answering NOT_FOUND for routers not loaded yet;
between NOT_SERVING and the refusals (``drain_delay_s``) it still serves."""

from __future__ import annotations

import asyncio

from moe_router.doors.admission import Admission
from moe_router.doors.health import HealthState
from moe_router.doors.request_wire import parse_route_request
from moe_router.doors.rpc_errors import Failure
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

        async def refusal(request_id: str) -> BaseException:
            outcome = await service._admitted_route(REQUEST, None, request_id)  # type: ignore[arg-type]
            assert isinstance(outcome, Failure) and outcome.request_id == request_id
            return outcome.error

        loading = await refusal("r1")
        assert isinstance(loading, DrainingError) and "loading its routers" in str(loading)
        assert status_code_for(loading).name == "UNAVAILABLE"
        await health.mark_ready()
        await health.mark_draining()
        assert not health.ready  # NOT_SERVING published ...
        assert isinstance(await refusal("r2"), NotFoundError)  # ... but the call is routed
        admission.close()
        draining = await refusal("r3")
        assert isinstance(draining, DrainingError) and "draining for shutdown" in str(draining)
        assert status_code_for(draining).name == "UNAVAILABLE"
        assert admission.stats().calls == 0

    asyncio.run(scenario())
