"""SIGTERM under load, against real `moe-router serve` processes: every call answered.

The promise (README "The server"): a call the server accepted is answered OK, or with a
retriable UNAVAILABLE that the client's retry policy sends to another replica; the
process exits 0. Each scenario runs ``MOE_ROUTER_DRAIN_RUNS`` times (3 in ``make test``,
more in ``make fuzz``): what broke before was a race (13 of 16 in-flight calls CANCELLED
in some runs, an abort at exit in 2 of 28).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from drain_scenario import (
    INPUTS,
    RUNS,
    assert_clean_exit,
    drain_config,
    signal_under_load,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from route_load import RouteLoad
from server_process import ServerProcess, start_server

from moe_router_client import RouterClient


@pytest.mark.parametrize("run", range(RUNS))
def test_sigterm_under_load_answers_every_call_and_exits_zero(tmp_path: Path, run: int):
    (tmp_path / "slow").touch()  # faulty's passes take 150 ms: calls are in flight
    server = start_server(drain_config(tmp_path))
    load = RouteLoad(server.target, INPUTS, callers=16, retries=0)
    moment = signal_under_load(server, load)
    in_flight = load.in_flight_at(moment)
    assert in_flight and sum(o.code == "OK" for o in in_flight) >= len(in_flight) // 2, in_flight


@pytest.mark.parametrize("run", range(RUNS))
def test_an_open_health_watch_neither_holds_the_exit_nor_logs_a_traceback(
    tmp_path: Path, run: int
):
    server = start_server(drain_config(tmp_path, drain_grace_s=120.0))
    seen: list[int] = []
    try:
        with grpc.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=90
            )
            seen.append(next(watch).status)
            server.proc.send_signal(15)
            # Before: the Watch held the drained server for the whole 120 s grace.
            status = server.proc.wait(60)
            try:
                for answer in watch:
                    seen.append(answer.status)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
    finally:
        server.terminate()
    assert_clean_exit(server, status)
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen[1:], seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_calls(target: str) -> int:
    with RouterClient(target, timeout=10) as client:
        return sum(r.requests for r in client.stats())


@pytest.mark.parametrize("run", range(RUNS))
def test_rolling_restart_of_two_replicas_loses_no_call(tmp_path: Path, run: int):
    """A round-robin client over two replicas with the client's retry policy; each
    replica in turn gets SIGTERM (NOT_SERVING, 0.3 s of serving, refusals, exit) and is
    started again on its port while the load goes on."""
    ports = [free_port(), free_port()]
    configs = [
        drain_config(tmp_path, f"replica{i}.yaml", port=port, drain_delay_s=0.3)
        for i, port in enumerate(ports)
    ]
    replicas = [start_server(config) for config in configs]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    load = RouteLoad(target, INPUTS, callers=8, retries=4, load_balancing="round_robin")
    statuses: list[int] = []
    stopped: list[ServerProcess] = []

    async def scenario() -> None:
        running = asyncio.ensure_future(load.run())
        await wait_for(lambda: load.counts()["OK"] >= 20)
        for i in range(2):
            old = replicas[i]
            old.proc.send_signal(15)
            statuses.append(await asyncio.to_thread(old.proc.wait, 60))
            stopped.append(old)
            replicas[i] = await asyncio.to_thread(start_server, configs[i])
            # The client reconnects with backoff: go on once the new replica serves load.
            await wait_for(lambda i=i: served_calls(replicas[i].target) >= 10, timeout=90)
        load.stop()
        await running

    try:
        asyncio.run(scenario())
    finally:
        for replica in replicas:
            replica.terminate()
    for old, status in zip(stopped, statuses, strict=True):
        assert_clean_exit(old, status)
    lost = [o for o in load.outcomes if o.code != "OK"]
    assert not lost, lost
    assert load.counts()["OK"] > 40
