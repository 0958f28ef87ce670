"""server.event_loop_cpu: the event loop and gRPC's completion-queue thread pinned to one
CPU, every other thread on all of the process's; read back from the kernel (/proc)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from inprocess_server import serve_in_process
from server_process import clean_env, small_routers, start_server, write_config

from moe_router.doors.cpu_pinning import pin_event_loop
from moe_router.errors import RouterConfigurationError
from moe_router_client import RouterClient

ALLOWED = frozenset(os.sched_getaffinity(0))
CPU = max(ALLOWED)  # the last CPU: on a 2-core machine the loop then has CPU 1


def _cpus(tid: int, pid: int | None = None) -> frozenset[int]:
    """The CPUs thread ``tid`` (of process ``pid``, this one by default) may run on."""
    task = f"/proc/{pid or os.getpid()}/task/{tid}/status"
    with open(task) as status:
        line = next(x for x in status if x.startswith("Cpus_allowed_list:"))
    cpus: set[int] = set()
    for span in line.split(":", 1)[1].strip().split(","):
        first, _, last = span.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def _routers(inline_max_us: int | None = None) -> list[dict]:
    routers = [r for r in small_routers() if r["name"] == "mixtral"]
    if inline_max_us is not None:
        routers[0]["batching"] = {"inline_max_us": inline_max_us}
    return routers


def test_the_loop_and_the_poller_are_pinned_and_every_other_thread_is_not(
        tmp_path: Path) -> None:
    # inline_max_us 0: every pass goes to a device worker, started by the pinned loop
    config = write_config(tmp_path / "config.yaml", _routers(inline_max_us=0),
                          server={"event_loop_cpu": CPU})
    x = np.random.default_rng(0).standard_normal((3, small_routers()[0]["input_dim"]),
                                                 dtype=np.float32)
    with serve_in_process(config) as server:
        (loop_thread,) = _threads("inprocess-server")
        (poller,) = [t for t in threading.enumerate() if t.name.endswith("(_poll_wrapper)")]
        assert loop_thread.native_id is not None and poller.native_id is not None
        with RouterClient(server.target, timeout=30) as client:
            for _ in range(4):
                assert client.route("mixtral", x).expert_indices.shape == (3, 2)
        assert _cpus(loop_thread.native_id) == {CPU}
        assert _cpus(poller.native_id) == {CPU}
        workers = _threads("device")
        assert workers, "the passes ran in device workers"
        for worker in workers:
            assert worker.native_id is not None
            assert _cpus(worker.native_id) == ALLOWED, worker.name
        for tid in os.listdir("/proc/self/task"):  # gRPC core's threads, the HTTP ones
            if int(tid) not in (loop_thread.native_id, poller.native_id):
                try:
                    assert _cpus(int(tid)) == ALLOWED, tid
                except FileNotFoundError:  # a thread that ended since the listing
                    pass
        assert f"pinned to CPU {CPU}" in server.log()
    # An in-process server hands the shared poller (and its loop thread) back on stop.
    assert _cpus(poller.native_id) == ALLOWED


def test_a_cpu_the_process_may_not_use_is_refused_naming_the_key(tmp_path: Path) -> None:
    outside = max(ALLOWED) + 1
    config = write_config(tmp_path / "config.yaml", _routers(),
                          server={"event_loop_cpu": outside})
    with pytest.raises(RouterConfigurationError) as refused, serve_in_process(config):
        pass
    assert f"server.event_loop_cpu: CPU {outside} is not one this process may run on; " \
        "expected one of" in str(refused.value)
    # ... and by `moe-router serve`: exit status 2, one line, no traceback.
    out = subprocess.run([sys.executable, "-m", "moe_router", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=90, env=clean_env())
    assert out.returncode == 2, out.stderr
    assert f"server.event_loop_cpu: CPU {outside} is not one" in out.stderr
    assert "Traceback" not in out.stderr


def test_allowed_cpus_are_named_as_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 8, 10, 11})
    with pytest.raises(RouterConfigurationError, match=r"expected one of 0-3,8,10-11 \(or null"):
        pin_event_loop(9)


@pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: a pinned thread looks like the rest")
def test_a_served_process_pins_its_main_thread_only(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", _routers(), server={"event_loop_cpu": CPU})
    server = start_server(config)
    try:
        pid = server.proc.pid
        assert _cpus(pid, pid) == {CPU}  # the main thread runs the event loop
        others = {int(t): _cpus(int(t), pid) for t in os.listdir(f"/proc/{pid}/task")
                  if int(t) != pid}
        pinned = [t for t, cpus in others.items() if cpus != ALLOWED]
        # Every thread but the loop's and the completion-queue poller's keeps them all.
        assert len(pinned) == 1 and others[pinned[0]] == {CPU}, others
        with RouterClient(server.target, timeout=30) as client:
            assert client.health().status == "SERVING"
    finally:
        assert server.terminate() == 0
