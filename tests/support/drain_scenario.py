"""The SIGTERM scenarios' shared pieces: a server config whose ``faulty`` router takes
150 ms a pass (so calls are in flight when the signal comes), the inputs, and what a
clean exit looks like."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
from route_load import RecordedLoad
from server_process import ServerProcess, small_routers, write_config

RUNS = int(os.environ.get("MOE_ROUTER_DRAIN_RUNS", "3"))
RETRIABLE = {"OK", "UNAVAILABLE"}


def drain_config(tmp_path: Path, name: str = "config.yaml", **server: object) -> Path:
    """Mixtral and ``faulty`` (150 ms passes while ``tmp_path/slow`` exists), no cache."""
    routers = [r for r in small_routers(fault_dir=tmp_path) if r["name"] in ("mixtral", "faulty")]
    for router in routers:
        if router["name"] == "faulty":
            router["fault"]["slow_ms"] = 150
    return write_config(
        tmp_path / name, routers, testing={"enable_fault_injection": True},
        cache={"enabled": False}, server={"drain_grace_s": 20.0, **server},
    )


INPUTS = [("faulty", np.ones((2, 16), np.float32)), ("mixtral", np.ones((3, 64), np.float32))]


def assert_clean_exit(server: ServerProcess, status: int) -> None:
    """Exit 0 after a drain that answered every call held, and nothing logged amiss."""
    log = server.log()
    assert status == 0, log
    assert "terminate called" not in log and "Traceback" not in log, log
    assert "drained: every call answered" in log, log


async def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until it holds (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def signal_under_load(server: ServerProcess, load: RecordedLoad) -> float:
    """Run ``load`` on ``server``, SIGTERM it once 20 calls were answered, and keep the
    load on until the process has left; check the exit clean and every outcome OK or
    UNAVAILABLE. Returns the moment of the signal."""

    async def scenario() -> tuple[float, int]:
        running = asyncio.ensure_future(load.run())
        await wait_for(lambda: load.counts()["OK"] >= 20)
        moment = time.monotonic()
        server.proc.send_signal(15)
        status = await asyncio.to_thread(server.proc.wait, 60)
        load.stop()
        await running
        return moment, status

    try:
        moment, status = asyncio.run(scenario())
    finally:
        server.terminate()
    assert_clean_exit(server, status)
    codes = load.counts()
    assert set(codes) <= RETRIABLE, [o for o in load.outcomes if o.code not in RETRIABLE]
    return moment
