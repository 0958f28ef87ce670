"""SIGTERM under load through the Open Inference Protocol and co-located doors: the drain
holds their calls as it holds Route's (README "The server").

Each door's calls are admitted by the server's one admission control, so the drain
waits for them before the process exits, and a call arriving during
``server.drain_delay_s`` (health already NOT_SERVING, load balancers still sending) is
served as a Route call is. Before, both doors checked readiness alone: their calls
were refused from the signal on, and the ones in flight were cut when the process left
once Route's calls were done.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from door_load import DOORS, DoorLoad
from drain_scenario import INPUTS, RUNS, drain_config, signal_under_load, wait_for
from inprocess_server import serve_in_process
from route_load import Outcome
from server_process import start_server

DELAY_S = 1.0


def sigterm_under_load(tmp_path: Path, door: str, delay_s: float) -> tuple[DoorLoad, float]:
    """Load through ``door`` and SIGTERM (:func:`drain_scenario.signal_under_load`); the
    load and the moment of the signal."""
    (tmp_path / "slow").touch()  # faulty's passes take 150 ms: calls are in flight
    server = start_server(drain_config(tmp_path, drain_delay_s=delay_s))
    load = DoorLoad(door, server.target, INPUTS, callers=8)
    return load, signal_under_load(server, load)


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("door", DOORS)
def test_sigterm_answers_the_calls_in_flight_on_every_door(
    tmp_path: Path, door: str, run: int
) -> None:
    """No drain delay: new calls are refused at once, the ones held are answered (the
    others in flight at the client had not reached the server: refused, retriably)."""
    load, moment = sigterm_under_load(tmp_path, door, 0.0)
    in_flight = load.in_flight_at(moment)
    assert in_flight and sum(o.code == "OK" for o in in_flight) >= len(in_flight) // 2, in_flight


@pytest.mark.parametrize("door", DOORS)
def test_every_door_serves_through_the_drain_delay(tmp_path: Path, door: str) -> None:
    load, moment = sigterm_under_load(tmp_path, door, DELAY_S)
    codes = load.counts()
    # Accepted before the signal: answered.
    in_flight = load.in_flight_at(moment)
    assert in_flight and all(o.code == "OK" for o in in_flight), in_flight
    # Sent during the drain delay (NOT_SERVING, not yet refusing): served.
    during_delay = [o for o in load.outcomes
                    if moment + 0.1 < o.started and o.ended < moment + 0.7 * DELAY_S]
    assert during_delay and all(o.code == "OK" for o in during_delay), during_delay
    # Then refused, retriably, until the process left.
    assert codes["UNAVAILABLE"] > 0, codes


@pytest.mark.parametrize("door", DOORS)
def test_every_door_is_bounded_by_the_servers_admission(tmp_path: Path, door: str) -> None:
    """``server.max_in_flight_calls: 1``: while a slow call is held, a second one through
    the door is refused RESOURCE_EXHAUSTED (``server.max_in_flight_calls`` named);
    once it is answered, calls are admitted again."""
    (tmp_path / "slow").touch()
    config = drain_config(tmp_path, max_in_flight_calls=1)
    with serve_in_process(config) as server:
        load = DoorLoad(door, server.target, [INPUTS[0]], callers=1)

        async def scenario() -> list[Outcome]:
            slow = asyncio.ensure_future(load.run())
            await wait_for(lambda: server.running.admission.stats().calls == 1)
            second = DoorLoad(door, server.target, [INPUTS[1]], callers=1)
            probe = asyncio.ensure_future(second.run())
            await wait_for(lambda: bool(second.outcomes))
            second.stop()
            load.stop()
            await asyncio.gather(slow, probe)
            again = DoorLoad(door, server.target, [INPUTS[1]], callers=1)
            single = asyncio.ensure_future(again.run())
            await wait_for(lambda: bool(again.outcomes))
            again.stop()
            await single
            return [second.outcomes[0], again.outcomes[0]]

        refused, admitted = asyncio.run(scenario())
    assert refused.code == "RESOURCE_EXHAUSTED" and "max_in_flight_calls" in refused.details, (
        refused)
    assert admitted.code == "OK", admitted
    assert load.counts()["OK"] >= 1
