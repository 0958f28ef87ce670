"""End to end over loopback: the real server (in-process, ``create_server``), real gRPC
calls; SIGTERM, exit statuses and a refused port run a `moe-router serve` process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from inprocess_server import serve_in_process
from server_process import clean_env, small_routers, start_server, write_config

from moe_router.config import load_config
from moe_router.doors.admission import MAX_READERS
from moe_router.loading.registry import load_routers
from moe_router_client import AsyncRouterClient, RouterClient
from moe_router_client.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RouterError,
    UnavailableError,
)

STATELESS = {"mixtral": 64, "deepseek": 32, "expert-choice": 32, "soft": 32}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: every router kind, batching that waits long enough
    for concurrent calls to meet, and no cache (each answer is computed)."""
    tmp = tmp_path_factory.mktemp("e2e")
    config = write_config(
        tmp / "config.yaml",
        small_routers(fault_dir=tmp),
        testing={"enable_fault_injection": True},
        batching={"max_queue_delay_us": 20000, "inline_max_us": 0},
        cache={"enabled": False},
    )
    hosted = load_routers(load_config(config, env={}))
    with serve_in_process(config) as server:
        yield server, hosted, tmp


@pytest.fixture()
def client(served):
    server, _, _ = served
    with RouterClient(server.target, timeout=30) as c:
        yield c


def in_process(hosted, router: str, x: torch.Tensor, layer: int = 0):
    with torch.inference_mode():
        return hosted[router].layers[layer](x)


def assert_same(result, expected) -> None:
    np.testing.assert_array_equal(result.expert_indices, expected.expert_indices.numpy())
    np.testing.assert_array_equal(result.expert_weights, expected.expert_weights.numpy())
    np.testing.assert_array_equal(
        result.num_experts_per_token, expected.num_experts_per_token.numpy()
    )


@pytest.mark.parametrize("router", sorted(STATELESS))
@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["tokens", "batch-seq"])
def test_route_equals_in_process_router(served, client, router, shape):
    _, hosted, _ = served
    x = torch.randn(*shape, STATELESS[router], generator=torch.Generator().manual_seed(7))
    result = client.route(router, x.numpy(), return_router_logits=True)
    expected = in_process(hosted, router, x)
    assert result.expert_indices.shape == (*shape, expected.k_max)
    assert result.expert_indices.dtype == np.int32
    assert_same(result, expected)
    np.testing.assert_array_equal(result.router_logits, expected.router_logits.numpy())
    assert result.info.router_version == hosted[router].versions[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_dtype_routes_like_in_process(served, client, dtype):
    _, hosted, _ = served
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    result = client.route("mixtral", x, layer=1)
    assert_same(result, in_process(hosted, "mixtral", x, layer=1))


def test_dynamic_router_answers_within_its_k_range_with_complexity(client):
    x = np.random.default_rng(0).standard_normal((4, 8, 32), dtype=np.float32)
    result = client.route("dynamic", x)
    k = result.num_experts_per_token
    assert k.shape == (4, 8) and k.min() >= 1 and k.max() <= 4
    assert result.complexity_scores.shape == (4, 8)
    padded = result.expert_indices == -1
    assert np.all(result.expert_weights[padded] == 0)
    assert np.all((~padded).sum(-1) == k)


def test_soft_moe_returns_dispatch_and_combine_weights(client):
    x = np.random.default_rng(1).standard_normal((6, 32), dtype=np.float32)
    result = client.route("soft", x)
    assert result.combine_weights.shape == (6, 8)  # 4 experts x 2 slots
    np.testing.assert_allclose(result.combine_weights.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.dispatch_weights.sum(0), 1.0, rtol=1e-5)


def test_concurrent_calls_are_batched_bit_identically(served):
    """A call only waits for company while a pass runs, and a few tokens' pass takes
    microseconds, less than the client takes to send the next call: the first call is a
    large one whose pass keeps the device busy while the others arrive (without it, one
    run in five on a loaded host merged nothing). 32 calls at once are more than
    admission lets read their messages together (MAX_READERS): the rest wait their turn,
    none is refused (16 calls alone merged nothing one run in eight)."""
    server, hosted, _ = served
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((30_000 if i == 0 else 1 + i % 5, 64), dtype=np.float32)
              for i in range(2 * MAX_READERS)]

    async def fire():
        async with AsyncRouterClient(server.target, timeout=30) as c:
            return await asyncio.gather(*(c.route("mixtral", x) for x in inputs))

    results = asyncio.run(fire())
    for x, result in zip(inputs, results, strict=True):
        assert_same(result, in_process(hosted, "mixtral", torch.from_numpy(x)))
    assert max(r.info.batch_requests for r in results) > 1, "no calls were merged"
    # A merged answer reports its pass's tokens: more than its own call brought.
    assert all(r.info.batch_tokens > x.shape[0]
               for x, r in zip(inputs, results, strict=True) if r.info.batch_requests > 1)


def test_route_stream_answers_in_request_order(client):
    rng = np.random.default_rng(5)
    requests = []
    for i in range(20):
        router, dim = ("mixtral", 64) if i % 2 else ("deepseek", 32)
        requests.append(
            {
                "router": router,
                "hidden_states": rng.standard_normal((1 + i, dim), dtype=np.float32),
                "layer": i % 2,
                "request_id": f"req-{i}",
            }
        )
    results = list(client.route_stream(requests))
    assert [r.info.request_id for r in results] == [f"req-{i}" for i in range(20)]
    assert [r.expert_indices.shape[0] for r in results] == [1 + i for i in range(20)]
    assert [r.info.layer for r in results] == [i % 2 for i in range(20)]


BAD_INPUTS = [
    (dict(router="nope"), NotFoundError, "unknown router 'nope'"),
    (
        dict(hidden=np.zeros((3, 63), np.float32)),
        InvalidArgumentError,
        "hidden_states dim 63 does not match router 'mixtral' input_dim 64",
    ),
    (dict(layer=9), NotFoundError, "has no layer 9; expected 0..1"),
    (dict(hidden=np.full((2, 64), np.inf, np.float32)), InvalidArgumentError, "non-finite"),
    (dict(hidden=np.zeros((2, 64), np.int64)), InvalidArgumentError,
     "dtype int64 is not accepted; expected float32, float16 or bfloat16"),
    (
        dict(hidden=np.zeros((2, 2, 2, 64), np.float32)),
        InvalidArgumentError,
        "[tokens, dim] or [batch, seq, dim]",
    ),
    (
        dict(extra={"gradients": np.zeros((3, 64), np.float32)}),
        InvalidArgumentError,
        "takes no estimator inputs",
    ),
]


@pytest.mark.parametrize("bad,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(client, bad, error, message):
    hidden = bad.get("hidden", np.zeros((3, 64), np.float32))
    with pytest.raises(error) as raised:
        client.route(
            bad.get("router", "mixtral"), hidden, layer=bad.get("layer", 0), **bad.get("extra", {})
        )
    assert message in raised.value.details
    assert client.route("mixtral", np.ones((2, 64), np.float32)).expert_indices.shape == (2, 2)


def test_malformed_tensor_bytes_are_invalid_argument(served):
    from moe_router_client.v1 import router_pb2 as pb
    from moe_router_client.v1 import router_pb2_grpc as pb_grpc

    server, _, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        bad = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 64], data=b"\0" * 12)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Route(pb.RouteRequest(router="mixtral", hidden_states=bad), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hidden_states" in raised.value.details() and "512" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            stub.Route(pb.RouteRequest(router="mixtral"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hidden_states: required" in raised.value.details()
        raw_route = channel.unary_unary("/moe_router.v1.RouterService/Route")
        with pytest.raises(grpc.RpcError) as raised:
            raw_route(b"\x0a\x07mixtral\x1a\xff\x01", timeout=10)  # truncated tensor
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed RouteRequest" in raised.value.details()


def test_backend_failure_is_internal_and_not_the_callers_fault(served, client):
    _, _, tmp = served
    (tmp / "fail").touch()
    try:
        with pytest.raises(RouterError) as raised:
            client.route("faulty", np.ones((2, 16), np.float32), skip_cache=True)
        assert raised.value.code == grpc.StatusCode.INTERNAL
        assert "injected fault" in raised.value.details
    finally:
        (tmp / "fail").unlink()
    assert client.route("faulty", np.ones((2, 16), np.float32)).expert_indices.shape == (2, 2)


def test_stats_list_and_health(client):
    client.route("mixtral", np.ones((3, 64), np.float32))
    (stats,) = client.stats("mixtral")
    assert stats.requests >= 1 and stats.tokens >= 3
    assert sum(stats.tokens_per_expert) == 2 * stats.tokens  # top-2, nothing cached or dropped
    assert 1 / 8 <= stats.load_balance_score <= 1.0
    assert stats.latency.samples >= 1 and stats.latency.p99_ms >= stats.latency.p50_ms > 0
    assert len(stats.layers) == 2
    assert {s.router for s in client.stats()} == {
        "mixtral",
        "deepseek",
        "expert-choice",
        "soft",
        "dynamic",
        "faulty",
    }
    with pytest.raises(NotFoundError):
        client.stats("nope")
    described = {r.name: r for r in client.list_routers()}
    assert described["deepseek"].num_experts == 16 and described["deepseek"].max_k == 4
    assert described["mixtral"].layers == 2 and described["mixtral"].batches_across_requests
    assert not described["soft"].batches_across_requests
    assert described["dynamic"].min_k == 1 and described["dynamic"].max_k == 4
    assert "BFLOAT16" in described["mixtral"].accepted_dtypes
    health = client.health()
    assert health.status == "SERVING" and health.device == "cpu" and health.uptime_s > 0
    assert {r.router for r in health.routers} == set(described)


def test_grpc_health_check_and_watch(served):
    server, _, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "moe_router.v1.RouterService", "moe_router.v1.RouterService/mixtral"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.health_port}/readyz", timeout=10) as r:
        assert r.status == 200 and json.load(r)["status"] == "SERVING"


def test_reflection_lists_the_service(served):
    server, _, _ = served
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "moe_router.v1.RouterService" in services
    assert "grpc.health.v1.Health" in services


def test_cli_route_and_stats_print_the_assignment(served):
    server, _, _ = served
    run = [sys.executable, "-m", "moe_router"]
    out = subprocess.run(
        [
            *run,
            "route",
            "--target",
            server.target,
            "--router",
            "mixtral",
            "--tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=True,
    )
    answer = json.loads(out.stdout)
    assert np.array(answer["expert_indices"]).shape == (4, 2)
    out = subprocess.run(
        [*run, "stats", "--target", server.target],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=True,
    )
    assert "mixtral" in out.stdout and "deepseek" in out.stdout


def wait_until_in_flight(metrics_port: int | None, router: str, timeout: float = 20.0) -> None:
    """Block until the server's in-flight gauge shows a call to ``router``."""
    needle = f'moe_router_in_flight_requests{{router="{router}"}} 1.0'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            if needle in r.read().decode():
                return
        time.sleep(0.02)
    raise AssertionError(f"no call to {router} became in flight within {timeout}s")


def test_sigterm_drains_in_flight_calls_and_exits_zero(tmp_path: Path):
    routers = [r for r in small_routers(fault_dir=tmp_path) if r["name"] == "faulty"]
    routers[0]["fault"]["slow_ms"] = 1500
    config = write_config(
        tmp_path / "config.yaml",
        routers,
        testing={"enable_fault_injection": True},
        cache={"enabled": False},
        server={"max_message_bytes": 1 << 20},
    )
    server = start_server(config)
    try:
        with RouterClient(server.target, timeout=30, retries=0) as c:
            with pytest.raises(ResourceExhaustedError):  # over the 1 MiB message limit
                c.route("faulty", np.zeros((20000, 16), np.float32))
            (tmp_path / "slow").touch()
            outcome: dict = {}

            def slow_call() -> None:
                try:
                    outcome["result"] = c.route("faulty", np.ones((2, 16), np.float32))
                except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                    outcome["error"] = exc

            caller = threading.Thread(target=slow_call)
            caller.start()
            wait_until_in_flight(server.metrics_port, "faulty")
            server.proc.send_signal(15)
            readiness = None
            for _ in range(20):
                try:
                    urllib.request.urlopen(
                        f"http://127.0.0.1:{server.health_port}/readyz", timeout=2
                    )
                except urllib.error.HTTPError as exc:
                    readiness = exc.code
                    break
                except OSError:
                    break
                time.sleep(0.05)
            with pytest.raises(UnavailableError):
                c.route("faulty", np.ones((2, 16), np.float32))
            caller.join(30)
        assert readiness == 503
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].expert_indices.shape == (2, 2)
        assert server.proc.wait(30) == 0, server.log()
        assert "draining" in server.log()
    finally:
        server.terminate()


def test_bad_config_and_taken_ports_exit_2_with_one_clear_line(tmp_path: Path):
    import socket

    serve = [sys.executable, "-m", "moe_router", "serve", "--config"]
    routers = [r for r in small_routers() if r["name"] == "mixtral"]
    routers[0]["top_k"] = 12
    bad = write_config(tmp_path / "bad.yaml", routers)
    out = subprocess.run([*serve, str(bad)], capture_output=True, text=True, timeout=60,
                         env=clean_env())
    assert out.returncode == 2
    assert "bad.yaml: routers[0].top_k: must be <= num_experts (8), got 12" in out.stderr
    assert "Traceback" not in out.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        clash = write_config(tmp_path / "clash.yaml", small_routers()[:1],
                             metrics={"port": port})
        out = subprocess.run([*serve, str(clash)], capture_output=True, text=True,
                             timeout=60, env=clean_env())
    assert out.returncode == 2
    assert f"metrics.port: could not listen on 127.0.0.1:{port}" in out.stderr
    assert "DYNAMIC_MOE_METRICS_PORT" in out.stderr and "Traceback" not in out.stderr


def test_a_second_server_on_a_taken_grpc_port_refuses_to_start(served, tmp_path: Path):
    server, _, _ = served
    config = write_config(tmp_path / "second.yaml", small_routers()[:1],
                          server={"port": server.port})
    out = subprocess.run([sys.executable, "-m", "moe_router", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == 2  # so_reuseport off: no silent sharing of the port
    assert f"server.port: could not listen on 127.0.0.1:{server.port}" in out.stderr
