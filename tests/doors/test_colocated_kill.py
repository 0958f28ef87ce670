"""SIGKILL of a client process and of the server process leaves nothing in /dev/shm: the
client's regions are memfds (never named there) that the server drops when it reads the
dead client's end of file; the server makes nothing there, and the socket file a killed
server leaves is removed by the next start on that path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from inprocess_server import serve_in_process
from server_process import small_routers, start_server, write_config
from waiting import wait_until

from moe_router_client import CoLocatedClient, UnavailableError

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir() or sys.platform != "linux",
                                reason="needs Linux and /dev/shm")

ROOT = Path(__file__).resolve().parents[2]
X = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
CLIENT = """
import sys, time
import numpy as np
from moe_router_client import CoLocatedClient
client = CoLocatedClient(sys.argv[1], socket_path=sys.argv[2], fallback=False)
x = np.ones((64, 64), np.float32)
client.route("mixtral", x)
print("routed", flush=True)
while True:  # routing on, layer after layer, until killed
    client.route("mixtral", x, layer=1)
"""


def shm_names_of(pids: set[int]) -> list[str]:
    """Entries of /dev/shm that name one of ``pids`` or this door: what a leak would be
    called (other test runs on the host may add their own entries meanwhile)."""
    return sorted(
        name for name in os.listdir("/dev/shm")
        if "colocated" in name or any(str(pid) in name for pid in pids)
    )


def test_sigkill_of_a_client_leaves_nothing_and_frees_its_regions(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_routers()[:1])
    with serve_in_process(config) as server:
        door = server.running.colocated
        assert door is not None
        child = subprocess.Popen(
            [sys.executable, "-c", CLIENT, server.target, str(door.socket_path)],
            stdout=subprocess.PIPE, text=True,
            env={"PYTHONPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"},
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "routed"
            assert len(door.regions) == 2 and door.connections == 1
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            child.kill()
        assert wait_until(lambda: door.connections == 0 and len(door.regions) == 0)
        with CoLocatedClient(server.target, fallback=False) as client:  # serving on
            assert client.route("mixtral", X).expert_indices.shape == (16, 2)
    assert shm_names_of({child.pid}) == []


def test_sigkill_of_the_server_leaves_nothing_and_the_next_start_cleans_up(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o700)
    path = tmp_path / "door.sock"
    config = write_config(tmp_path / "config.yaml", small_routers()[:1],
                          colocated={"socket_path": str(path)})
    server = start_server(config)
    try:
        client = CoLocatedClient(server.target, socket_path=path, fallback=False, timeout=30)
        first = client.route("mixtral", X)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        with pytest.raises(UnavailableError):
            client.route("mixtral", X)
        assert path.exists()  # a killed server cannot remove its socket file ...
        assert shm_names_of({server.proc.pid, os.getpid()}) == []  # ... and made no shm
    finally:
        server.terminate()
    again = start_server(config)  # ... the next start on the path removes it and serves
    try:
        second = CoLocatedClient(again.target, socket_path=path, fallback=False, timeout=30)
        assert second.route("mixtral", X).expert_indices.tobytes() == (
            first.expert_indices.tobytes())
        second.close()
        client.close()
    finally:
        again.terminate()
    assert not path.exists()  # a clean stop removes it
    assert shm_names_of({again.proc.pid, os.getpid()}) == []
