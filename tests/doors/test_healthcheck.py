"""`moe-router healthcheck` (doors/healthcheck.py) against a real server and real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from server_process import clean_env, small_routers, start_server, write_config

from moe_router.doors.healthcheck import check_health, main


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    config = write_config(tmp_path_factory.mktemp("healthcheck") / "config.yaml",
                          small_routers()[:1])
    server = start_server(config)
    yield server
    assert server.terminate() == 0, server.log()


@pytest.fixture
def not_serving_server():
    """A plain gRPC server whose grpc.health.v1 says NOT_SERVING for ''."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "service", ["", "moe_router.v1.RouterService", "moe_router.v1.RouterService/mixtral"]
)
def test_a_ready_server_is_serving_for_every_name_the_probes_use(served, service):
    outcome = check_health(served.target, service)
    assert outcome.healthy and outcome.exit_status == 0
    assert outcome.line.startswith("SERVING: ")
    assert served.target in outcome.line


def test_an_unknown_service_name_is_unhealthy_and_named(served):
    outcome = check_health(served.target, "moe_router.v1.RouterService/nope")
    assert outcome.exit_status == 1
    assert outcome.line.startswith("UNKNOWN_SERVICE: ")
    assert "'moe_router.v1.RouterService/nope'" in outcome.line


def test_not_serving_is_unhealthy(not_serving_server):
    outcome = check_health(not_serving_server)
    assert outcome == type(outcome)(False, f"NOT_SERVING: the server ('') at {not_serving_server}")


def test_nothing_listening_is_unreachable():
    target = f"127.0.0.1:{_closed_port()}"
    outcome = check_health(target, timeout_s=2.0)
    assert outcome.exit_status == 1
    assert outcome.line == f"UNREACHABLE: nothing answers gRPC at {target}"


def test_a_silent_peer_times_out():
    with socket.socket() as listener:  # accepts TCP but never speaks HTTP/2
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        outcome = check_health(target, timeout_s=0.5)
    assert outcome.exit_status == 1
    assert outcome.line == f"TIMEOUT: {target} did not answer within 0.5 s"


def test_a_non_positive_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout_s: a positive number"):
        check_health("127.0.0.1:1", timeout_s=0)


def test_main_prints_one_line_and_returns_the_status(served, capsys):
    assert main(["--target", served.target]) == 0
    assert capsys.readouterr().out == f"SERVING: the server ('') at {served.target}\n"
    assert main(["--target", served.target, "--timeout", "-1"]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err


def test_the_module_runs_as_a_command_without_torch(served):
    """What the image's HEALTHCHECK runs: exit 0, one line, and torch is never imported."""
    code = (
        "import sys, runpy; sys.argv = ['healthcheck', '--target', sys.argv[1]];"
        "\ntry: runpy.run_module('moe_router.doors.healthcheck', run_name='__main__')"
        "\nexcept SystemExit as e: print('torch' in sys.modules); raise"
    )
    repo = Path(__file__).resolve().parents[2]
    env = clean_env(PYTHONPATH=f"{repo / 'server'}:{repo / 'client'}")
    done = subprocess.run([sys.executable, "-c", code, served.target], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"SERVING: the server ('') at {served.target}", "False"]
