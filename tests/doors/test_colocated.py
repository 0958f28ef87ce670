"""The co-located door end to end: a real server (in this process), CoLocatedClient and
AsyncCoLocatedClient here and in a child process; every answer compared bit for bit
with RouterClient.route's on the same server, and the chain's counts moving the same."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess_server import InProcessServer, serve_in_process
from routed_answers import assert_same_answer
from server_process import small_routers, write_config
from waiting import wait_until

from moe_router_client import (
    AsyncCoLocatedClient,
    CoLocatedClient,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RouterClient,
    RouteResult,
    UnavailableError,
)
from moe_router_client.colocated import local_socket_path

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the door is Linux-only")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """Every router kind (the dynamic one stateless, so calls can be compared), and
    `mixtral-wait`, whose batcher holds calls up to 50 ms so that concurrent calls meet."""
    routers = small_routers()
    mixtral = next(r for r in routers if r["name"] == "mixtral")
    routers.append({**mixtral, "name": "mixtral-wait", "batching": {"max_queue_delay_us": 50000,
                                                                    "inline_max_us": 0}})
    dynamic = next(r for r in routers if r["name"] == "dynamic")
    dynamic.update(load_balancing=False, complexity_estimator="perplexity_proxy")
    config = write_config(tmp_path_factory.mktemp("colocated") / "config.yaml", routers)
    with serve_in_process(config) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_client(server: InProcessServer) -> Iterator[RouterClient]:
    with RouterClient(server.target, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> Iterator[CoLocatedClient]:
    with CoLocatedClient(server.target, timeout=30) as c:
        assert c.transport == "colocated"
        yield c


def hidden(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_default_socket_path_is_found_from_the_grpc_target(server: InProcessServer) -> None:
    door = server.running.colocated
    assert door is not None
    assert local_socket_path(server.target) == door.socket_path
    assert local_socket_path(f"localhost:{server.port}") == door.socket_path
    assert local_socket_path(f"10.1.2.3:{server.port}") is None


@pytest.mark.parametrize("inline_limit", [65536, 0], ids=["inline", "region"])
@pytest.mark.parametrize("router,dim", [("mixtral", 64), ("deepseek", 32), ("soft", 32),
                                        ("expert-choice", 32), ("dynamic", 32)])
def test_every_router_answers_the_bits_route_answers(
    server: InProcessServer, grpc_client: RouterClient, router: str, dim: int,
    inline_limit: int,
) -> None:
    with CoLocatedClient(server.target, timeout=30, inline_limit=inline_limit) as client:
        for seed, shape in enumerate([(1, dim), (7, dim), (2, 3, dim), (0, dim)]):
            x = hidden(shape, seed)
            got = client.route(router, x, skip_cache=True, return_router_logits=True)
            expected = grpc_client.route(router, x, skip_cache=True, return_router_logits=True)
            assert_same_answer(got, expected)
            assert got.expert_indices.shape[:-1] == shape[:-1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_and_numpy_bf16(
    client: CoLocatedClient, grpc_client: RouterClient, dtype: torch.dtype
) -> None:
    x = hidden((5, 64), 11, dtype)
    assert_same_answer(client.route("mixtral", x, layer=1, skip_cache=True),
                       grpc_client.route("mixtral", x, layer=1, skip_cache=True))
    if dtype is torch.bfloat16:
        ml_dtypes = pytest.importorskip("ml_dtypes")
        bits = x.float().numpy().astype(ml_dtypes.bfloat16)
        assert_same_answer(client.route("mixtral", bits, layer=1, skip_cache=True),
                           grpc_client.route("mixtral", x, layer=1, skip_cache=True))


def test_estimator_inputs_travel_beside_the_hidden_states(
    client: CoLocatedClient, grpc_client: RouterClient
) -> None:
    x = hidden((1, 6, 32), 3)
    logits = hidden((1, 6, 50), 4)
    got = client.route("dynamic", x, logits=logits, skip_cache=True)
    expected = grpc_client.route("dynamic", x, logits=logits, skip_cache=True)
    assert_same_answer(got, expected)
    assert got.complexity_scores is not None


def test_as_torch_answers_torch_tensors(client: CoLocatedClient) -> None:
    result = client.route("mixtral", hidden((3, 64), 5), as_torch=True, skip_cache=True)
    assert isinstance(result.expert_indices, torch.Tensor)
    assert result.expert_indices.dtype == torch.int32 and result.expert_indices.shape == (3, 2)


def test_regions_are_reused_across_layers_and_grow_when_a_call_needs_more(
    server: InProcessServer, grpc_client: RouterClient
) -> None:
    regions = server.running.colocated.regions
    before = len(regions)
    with CoLocatedClient(server.target, timeout=30) as client:
        for tokens in (1, 4, 1, 300, 2, 1500, 3):  # 64 KiB regions, then two growths
            for layer in (0, 1):
                x = hidden((tokens, 64), tokens + layer)
                assert_same_answer(client.route("mixtral", x, layer=layer, skip_cache=True),
                                   grpc_client.route("mixtral", x, layer=layer, skip_cache=True))
            assert len(regions) == before + 2  # one input, one output region: replaced
    # the connection closed: its regions go when the server reads the end of file
    assert wait_until(lambda: len(regions) == before)


def test_cache_metrics_and_stats_count_both_doors_as_one(
    client: CoLocatedClient, grpc_client: RouterClient
) -> None:
    x = hidden((4, 64), 1234)
    start = grpc_client.stats("mixtral")[0]
    first = client.route("mixtral", x)
    again = client.route("mixtral", x)
    over_grpc = grpc_client.route("mixtral", x)
    after = grpc_client.stats("mixtral")[0]
    assert (first.info.cache_hit, again.info.cache_hit, over_grpc.info.cache_hit) == (
        False, True, True)
    assert after.requests - start.requests == 3
    assert after.tokens - start.tokens == 12
    assert after.cache.hit_count - start.cache.hit_count == 2
    assert after.cache.miss_count - start.cache.miss_count == 1
    assert_same_answer(again, over_grpc)


def test_errors_take_the_status_codes_route_gives(
    client: CoLocatedClient, grpc_client: RouterClient
) -> None:
    cases = [
        (("nope", hidden((1, 64), 0)), {}, NotFoundError),
        (("mixtral", hidden((1, 64), 0)), {"layer": 9}, NotFoundError),
        (("mixtral", hidden((1, 63), 0)), {}, InvalidArgumentError),
        (("mixtral", torch.full((2, 64), float("nan"))), {"skip_cache": True},
         InvalidArgumentError),
        (("mixtral", hidden((1, 64), 0)), {"attention_weights": hidden((1, 1, 1), 0)},
         InvalidArgumentError),
        (("dynamic", hidden((1, 6, 32), 0)), {"logits": torch.ones(1, 6, 50, dtype=torch.int32),
                                              "skip_cache": True}, InvalidArgumentError),
    ]
    for args, kwargs, error in cases:
        with pytest.raises(error) as over_door:
            client.route(*args, **kwargs)
        with pytest.raises(error) as over_grpc:
            grpc_client.route(*args, **kwargs)
        assert over_door.value.code == over_grpc.value.code
        assert over_door.value.reason == over_grpc.value.reason
        assert over_door.value.details.split(" (request id")[0] in over_grpc.value.details
    # the client stays usable after every error
    assert client.route("mixtral", hidden((1, 64), 1), skip_cache=True).info.layer == 0


def test_a_deadline_that_has_passed_is_deadline_exceeded(client: CoLocatedClient) -> None:
    with pytest.raises(DeadlineExceededError):
        client.route("mixtral", hidden((1, 64), 2), skip_cache=True, timeout=0.0)
    assert client.route("mixtral", hidden((1, 64), 2), skip_cache=True).info.layer == 0


def test_many_threads_share_one_client(
    server: InProcessServer, grpc_client: RouterClient
) -> None:
    # Each thread's first call is large: its pass keeps the device busy while the other
    # threads' calls arrive (a few tokens' pass takes microseconds).
    inputs = [hidden((20_000 if i < 16 else 1 + i % 5, 64), 500 + i) for i in range(64)]
    expected = [grpc_client.route("mixtral-wait", x, skip_cache=True) for x in inputs]
    got: dict[int, RouteResult] = {}
    errors: list[BaseException] = []
    with CoLocatedClient(server.target, timeout=60, max_connections=8) as client:

        def work(first: int) -> None:
            try:
                for i in range(first, len(inputs), 16):
                    got[i] = client.route("mixtral-wait", inputs[i], skip_cache=True)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for i, result in got.items():
        assert_same_answer(result, expected[i])
    assert len(got) == len(inputs)
    assert max(r.info.batch_requests for r in got.values()) > 1  # the batcher merged calls


def test_async_client_many_tasks(server: InProcessServer, grpc_client: RouterClient) -> None:
    inputs = [hidden((2, 64), 900 + i) for i in range(40)]
    expected = [grpc_client.route("mixtral-wait", x, layer=1, skip_cache=True) for x in inputs]

    async def main() -> list[RouteResult]:
        async with await AsyncCoLocatedClient.connect(server.target, timeout=60) as client:
            assert client.transport == "colocated"
            return await asyncio.gather(*(
                client.route("mixtral-wait", x, layer=1, skip_cache=True) for x in inputs
            ))

    for result, want in zip(asyncio.run(main()), expected, strict=True):
        assert_same_answer(result, want)


def test_without_a_door_the_client_falls_back_to_grpc(
    server: InProcessServer, grpc_client: RouterClient, tmp_path: Path
) -> None:
    x = hidden((2, 64), 77)
    absent = tmp_path / "no-door.sock"
    with CoLocatedClient(server.target, socket_path=absent, timeout=30) as client:
        assert client.transport == "grpc"
        assert_same_answer(client.route("mixtral", x, skip_cache=True),
                           grpc_client.route("mixtral", x, skip_cache=True))
    with pytest.raises(UnavailableError):
        CoLocatedClient(server.target, socket_path=absent, fallback=False)

    async def fall_back() -> str:
        async with await AsyncCoLocatedClient.connect(server.target, socket_path=absent) as c:
            await c.route("mixtral", x, skip_cache=True)
            return c.transport

    assert asyncio.run(fall_back()) == "grpc"


def test_regions_of_the_door_are_the_oip_doors_regions(
    server: InProcessServer, client: CoLocatedClient
) -> None:
    triton = pytest.importorskip("tritonclient.grpc")
    client.route("mixtral", hidden((1, 64), 8), skip_cache=True)
    with triton.InferenceServerClient(server.target) as oip:
        names = set(oip.get_system_shared_memory_status(as_json=True).get("regions", {}))
    assert any(name.startswith("colocated-") and "-outputs-" in name for name in names), names


CHILD = """
import json, sys
import numpy as np
from moe_router_client import CoLocatedClient
target = sys.argv[1]
x = np.random.default_rng(42).standard_normal((6, 64)).astype(np.float32)
with CoLocatedClient(target, timeout=30) as client:
    result = client.route("mixtral", x, layer=1, skip_cache=True)
    print(json.dumps({"transport": client.transport,
                      "indices": result.expert_indices.tobytes().hex(),
                      "weights": result.expert_weights.tobytes().hex(),
                      "torch": "torch" in sys.modules}))
"""


def test_a_client_in_another_process(server: InProcessServer, grpc_client: RouterClient) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, server.target], capture_output=True, text=True,
        timeout=120, env={"PYTHONPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    x = np.random.default_rng(42).standard_normal((6, 64)).astype(np.float32)
    expected = grpc_client.route("mixtral", x, layer=1, skip_cache=True)
    assert report["transport"] == "colocated"
    assert report["torch"] is False  # the client needs numpy only
    assert bytes.fromhex(report["indices"]) == expected.expert_indices.tobytes()
    assert bytes.fromhex(report["weights"]) == expected.expert_weights.tobytes()
