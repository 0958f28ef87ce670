"""Shared buffers of the co-located clients: arrays in shared memory the server reads where
they lie. Against a real server in this process, every answer compared bit for bit with
RouterClient.route's on the same values, and the no-copy promise checked on the client's
own input region (never made when only shared buffers are sent)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from inprocess_server import InProcessServer, serve_in_process
from routed_answers import assert_same_answer
from server_process import small_routers, write_config
from waiting import wait_until

from moe_router_client import AsyncCoLocatedClient, CoLocatedClient, RouterClient

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the door is Linux-only")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    config = write_config(tmp_path_factory.mktemp("shared") / "config.yaml", small_routers())
    with serve_in_process(config) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_client(server: InProcessServer) -> Iterator[RouterClient]:
    with RouterClient(server.target, timeout=30) as client:
        yield client


def _sessions(client: CoLocatedClient | AsyncCoLocatedClient) -> list:
    return [connection.session for connection in client._idle]


def test_a_shared_buffer_is_read_in_place_and_answers_as_route(
    server: InProcessServer, grpc_client: RouterClient
) -> None:
    regions = server.running.colocated.regions
    before = len(regions)
    with CoLocatedClient(server.target, timeout=30) as client:
        buffer = client.shared_buffer((5, 64))
        assert isinstance(buffer, np.ndarray) and buffer.dtype == np.float32
        assert len(regions) == before + 1  # registered at once, through its own connection
        for seed in range(3):  # the same buffer, new values each layer
            buffer[:] = np.random.default_rng(seed).standard_normal((5, 64))
            for layer in (0, 1):
                got = client.route("mixtral", buffer, layer=layer, skip_cache=True)
                assert_same_answer(got, grpc_client.route("mixtral", buffer.copy(),
                                                          layer=layer, skip_cache=True))
        assert all(session.inputs is None for session in _sessions(client))  # never copied
    assert wait_until(lambda: len(regions) == before)  # the server dropped it on close
    buffer[0, 0] = 1.0  # the memory lives on with the array


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_contiguous_slice_goes_by_offset_and_a_strided_view_is_copied(
    server: InProcessServer, grpc_client: RouterClient, dtype: torch.dtype
) -> None:
    regions = server.running.colocated.regions
    before = len(regions)
    with CoLocatedClient(server.target, timeout=30) as client:
        buffer = client.shared_buffer((12, 64), dtype)
        assert isinstance(buffer, torch.Tensor) and buffer.dtype == dtype
        buffer.copy_(torch.randn(12, 64, generator=torch.Generator().manual_seed(4)))
        rows = buffer[3:8]  # contiguous, 3 rows into the region
        assert_same_answer(client.route("mixtral", rows, skip_cache=True),
                           grpc_client.route("mixtral", rows.clone(), skip_cache=True))
        assert all(session.inputs is None for session in _sessions(client))
        every_other = buffer[::2]  # not contiguous: copied into the input region
        assert_same_answer(client.route("mixtral", every_other, skip_cache=True),
                           grpc_client.route("mixtral", every_other.contiguous(),
                                             skip_cache=True))
        assert any(session.inputs is not None for session in _sessions(client))
    assert wait_until(lambda: len(regions) == before)  # the next test counts from here


def test_the_asyncio_client_reads_shared_buffers_in_place(
    server: InProcessServer, grpc_client: RouterClient
) -> None:
    regions = server.running.colocated.regions
    before = len(regions)
    x = np.random.default_rng(9).standard_normal((2, 3, 64)).astype(np.float32)

    async def run() -> None:
        async with await AsyncCoLocatedClient.connect(server.target, timeout=30) as client:
            buffers = [await client.shared_buffer((2, 3, 64)) for _ in range(2)]
            assert len(regions) == before + 2
            for buffer in buffers:
                buffer[:] = x
            got = await asyncio.gather(*(client.route("mixtral", b, skip_cache=True)
                                         for b in buffers))
            for answer in got:
                assert_same_answer(answer, grpc_client.route("mixtral", x, skip_cache=True))
            assert all(session.inputs is None for session in _sessions(client))

    asyncio.run(run())
    assert wait_until(lambda: len(regions) == before)


def test_without_the_door_a_shared_buffer_is_an_ordinary_array(
    server: InProcessServer, grpc_client: RouterClient, tmp_path
) -> None:
    with CoLocatedClient(server.target, socket_path=tmp_path / "absent.sock",
                         timeout=30) as client:
        assert client.transport == "grpc"
        buffer = client.shared_buffer((2, 64), torch.float32)
        buffer.copy_(torch.ones(2, 64))
        assert_same_answer(client.route("mixtral", buffer, skip_cache=True),
                           grpc_client.route("mixtral", buffer, skip_cache=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("callers", [1, 2], ids=["blocking", "asyncio"])
def test_the_benchs_adapter_routes_from_a_shared_buffer(
    server: InProcessServer, grpc_client: RouterClient, dtype: str, callers: int
) -> None:
    """``moe-router bench`` measures the door as it is meant to be used: its hidden states
    written once into a shared buffer of the client (blocking for a lone caller), never
    copied per call, with Route's answer."""
    from moe_router.analysis.load_worker import (
        COLOCATED_BLOCKING_CLIENT_CLASS,
        ColocatedCaller,
        LoadSpec,
    )

    spec = LoadSpec(target=server.target, method="route", router="mixtral", tokens=3, dim=64,
                    dtype=dtype, transport="colocated",
                    blocking_client_class=COLOCATED_BLOCKING_CLIENT_CLASS)
    caller = ColocatedCaller(spec)
    caller.drive(callers)

    async def run() -> tuple[int, np.ndarray]:
        try:
            size = await caller.call()
            await caller.call()
            client = caller._blocking if callers == 1 else caller._client
            (sent,) = caller._inputs.values()
            assert client._shared.find(sent) is not None  # a reference, not a copy
            assert all(session.inputs is None for session in _sessions(client))
            return size, np.array(sent)
        finally:
            await caller.close()

    size, sent = asyncio.run(run())
    assert np.array_equal(sent.view(np.uint8), caller._hidden.view(np.uint8))
    answer = grpc_client.route("mixtral", caller._hidden, skip_cache=True)
    assert size == (answer.expert_indices.nbytes + answer.expert_weights.nbytes
                    + answer.num_experts_per_token.nbytes)
