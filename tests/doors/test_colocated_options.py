"""The co-located door's per-call options that the gRPC door carries too: a hash
router's ``input_ids`` (inline or in the region, numpy or torch, [T] or [B, S]) give
the gRPC door's answer bit for bit, bad ones are INVALID_ARGUMENT naming input_ids with
the gRPC door's message, and ``return_losses`` reaches ``RouteOptions`` and the answer
carries the gRPC door's aux and z losses; the gRPC fallback passes both on."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hash_router import VOCAB, D, K, write_hash_router
from inprocess_server import InProcessServer, serve_in_process
from routed_answers import assert_same_answer
from server_process import small_routers, write_config

from moe_router.doors.colocated_convert import RegionViews, route_to_call
from moe_router.errors import ValidationError
from moe_router_client import (
    AsyncCoLocatedClient,
    CoLocatedClient,
    InvalidArgumentError,
    RouterClient,
    RouteResult,
)
from moe_router_client import colocated as colocated_module
from moe_router_client import colocated_wire as wire
from moe_router_client.colocated_session import MemfdRegion
from moe_router_client.v1 import router_pb2 as pb

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the door is Linux-only")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessServer, Any]]:
    """A hash router (its table known here) and mixtral, cache on."""
    tmp = tmp_path_factory.mktemp("colocated-options")
    router = write_hash_router(tmp)
    hashed, table = router.entry, router.table
    config = write_config(tmp / "config.yaml", [hashed, small_routers()[0]])
    with serve_in_process(config) as server:
        yield server, table


@pytest.fixture(scope="module")
def grpc_client(served: tuple[InProcessServer, Any]) -> Iterator[RouterClient]:
    with RouterClient(served[0].target, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(served: tuple[InProcessServer, Any]) -> Iterator[CoLocatedClient]:
    with CoLocatedClient(served[0].target, timeout=30) as c:
        assert c.transport == "colocated"
        yield c


def hidden(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# ---------------------------------------------------------------- input_ids
IDS = [
    np.array([5, 0, 31, 7], dtype=np.int64),
    np.array([[5, 0, 31], [7, 7, 2]], dtype=np.int32),
    torch.tensor([3, 9, 31, 0, 1], dtype=torch.int64),
    torch.tensor([[1, 2], [30, 31]], dtype=torch.int32),
]


@pytest.mark.parametrize("inline_limit", [65536, 0], ids=["inline", "region"])
@pytest.mark.parametrize("ids", IDS, ids=["np-int64-T", "np-int32-BS", "torch-int64-T",
                                          "torch-int32-BS"])
def test_a_hash_router_answers_the_bits_route_answers(
    served: tuple[InProcessServer, Any], grpc_client: RouterClient, ids: Any,
    inline_limit: int,
) -> None:
    server, table = served
    x = hidden((*ids.shape, D), seed=int(ids.sum()))
    with CoLocatedClient(server.target, timeout=30, inline_limit=inline_limit) as client:
        assert client.transport == "colocated"
        got = client.route("hashed", x, input_ids=ids, skip_cache=True,
                           return_router_logits=True)
    expected = grpc_client.route("hashed", x, input_ids=ids, skip_cache=True,
                                 return_router_logits=True)
    assert_same_answer(got, expected)
    # the table's rows of the ids sent, in hidden_states' leading dims
    assert np.array_equal(got.expert_indices, table[torch.as_tensor(ids).long()].numpy())


def test_the_async_client_sends_input_ids_too(
    served: tuple[InProcessServer, Any], grpc_client: RouterClient
) -> None:
    server, _ = served
    ids = [np.arange(i, i + 3, dtype=np.int64) for i in range(6)]
    xs = [hidden((3, D), seed=40 + i) for i in range(6)]

    async def main() -> list[RouteResult]:
        async with await AsyncCoLocatedClient.connect(server.target, timeout=30) as c:
            assert c.transport == "colocated"
            return await asyncio.gather(*(
                c.route("hashed", x, input_ids=i, skip_cache=True)
                for x, i in zip(xs, ids, strict=True)
            ))

    for got, x, i in zip(asyncio.run(main()), xs, ids, strict=True):
        assert_same_answer(got, grpc_client.route("hashed", x, input_ids=i, skip_cache=True))


def test_the_ids_are_part_of_the_cache_key_over_the_door(
    client: CoLocatedClient, grpc_client: RouterClient
) -> None:
    x = hidden((4, D), seed=99)
    first = client.route("hashed", x, input_ids=np.array([1, 2, 3, 4]))
    other = client.route("hashed", x, input_ids=np.array([4, 3, 2, 1]))
    again = client.route("hashed", x, input_ids=np.array([1, 2, 3, 4]))
    assert (first.info.cache_hit, other.info.cache_hit, again.info.cache_hit) == (
        False, False, True)
    assert first.expert_indices.tobytes() != other.expert_indices.tobytes()
    assert_same_answer(again, first)
    assert grpc_client.route("hashed", x, input_ids=np.array([4, 3, 2, 1])).info.cache_hit


BAD_IDS = [
    ("hashed", None, r"input_ids: router 'hashed' routes by token id and needs input_ids, "
                     r"an INT32 or INT64 tensor of shape \[4\]"),
    ("hashed", np.array([1, 2, 3], dtype=np.int64), r"input_ids: must be .* got shape \[3\]"),
    ("hashed", np.arange(4, dtype=np.int64).reshape(2, 2),
     r"input_ids: must be .* got shape \[2, 2\]"),
    ("hashed", np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32),
     r"input_ids: must be .* got dtype torch.float32"),
    ("hashed", np.array([0, 1, 2, VOCAB], dtype=np.int64),
     r"input_ids: token ids must be in \[0, 32\)"),
    ("mixtral", np.arange(4, dtype=np.int64),
     r"input_ids: router 'mixtral' does not route by token id"),
]


@pytest.mark.parametrize("inline_limit", [65536, 0], ids=["inline", "region"])
@pytest.mark.parametrize(("router", "ids", "match"), BAD_IDS,
                         ids=["missing", "short", "rank", "float", "range", "not-hash"])
def test_bad_input_ids_are_invalid_argument_naming_them_as_over_grpc(
    served: tuple[InProcessServer, Any], grpc_client: RouterClient, router: str, ids: Any,
    match: str, inline_limit: int,
) -> None:
    server, _ = served
    x = hidden((4, D if router == "hashed" else 64), seed=7)
    with CoLocatedClient(server.target, timeout=30, inline_limit=inline_limit) as client:
        with pytest.raises(InvalidArgumentError, match=match) as over_door:
            client.route(router, x, input_ids=ids, skip_cache=True, request_id="bad-ids")
        with pytest.raises(InvalidArgumentError) as over_grpc:
            grpc_client.route(router, x, input_ids=ids, skip_cache=True, request_id="bad-ids")
        assert over_door.value.details == over_grpc.value.details
        assert over_door.value.reason == over_grpc.value.reason
        # the same connection and the server go on serving
        good = client.route("hashed", hidden((2, D), 8), input_ids=np.array([1, 2]))
        assert good.expert_indices.shape == (2, K)


def _route_message(tensors: tuple[wire.TensorRef, ...], output: MemfdRegion,
                   **options: Any) -> wire.Route:
    return wire.Route(1, "hashed", 0, wire.RegionRef(output.name, 0, output.size), tensors,
                      "r", **options)


def test_the_server_copies_the_ids_out_of_the_region_and_reads_the_flags(
    served: tuple[InProcessServer, Any],
) -> None:
    """Ids index the hash table: the caller must not be able to change them between the
    range check and the lookup, so the call holds a copy, not a view of the region."""
    server, _ = served
    door = server.running.colocated
    assert door is not None
    owner = "test-owner"
    inputs, output = MemfdRegion("opt-in", 4096), MemfdRegion("opt-out", 4096)
    try:
        for region in (inputs, output):
            assert region.fd is not None
            door.regions.register_descriptor(region.name, os.dup(region.fd), region.size,
                                             owner=owner)
        x, ids = hidden((3, D), 1), np.array([4, 5, 6], dtype=np.int64)
        inputs.bytes[:x.nbytes] = x.view(np.uint8).reshape(-1)
        inputs.bytes[1024:1024 + ids.nbytes] = ids.view(np.uint8)
        refs = (
            wire.TensorRef("hidden_states", pb.FLOAT32, x.shape,
                           wire.RegionRef(inputs.name, 0, x.nbytes)),
            wire.TensorRef("input_ids", pb.INT64, ids.shape,
                           wire.RegionRef(inputs.name, 1024, ids.nbytes)),
        )
        for asked in (True, False):
            message = _route_message(refs, output, return_losses=asked, skip_cache=True)
            call = route_to_call(message, server.running.chains,
                                 RegionViews(door.regions, owner), peer="p",
                                 device=torch.device("cpu"))
            assert call.options.return_losses is asked
            assert call.options.skip_cache and not call.options.return_router_logits
            assert call.options.input_ids is not None
            assert call.options.input_ids.tolist() == [4, 5, 6]
        # the caller rewrites its region: the hidden states (a view) see it, the ids do not
        inputs.bytes[:x.nbytes] = np.zeros_like(x).view(np.uint8).reshape(-1)
        inputs.bytes[1024:1024 + ids.nbytes] = np.full(3, VOCAB + 5).view(np.uint8)
        assert not call.hidden_states.any()
        assert call.options.input_ids.tolist() == [4, 5, 6]
        cuda = wire.CudaIpcRef(0, b"\x01" * 64, 64, 0, 0, (1,), b"", 0, b"", False)
        by_handle = (refs[0], wire.TensorRef("input_ids", pb.INT64, ids.shape, cuda))
        with pytest.raises(ValidationError, match="input_ids: send them as host bytes"):
            route_to_call(_route_message(by_handle, output), server.running.chains,
                          RegionViews(door.regions, owner), peer="p",
                          device=torch.device("cpu"))
    finally:
        for region in (inputs, output):
            door.regions.unregister(region.name, owner=owner)
            region.close()


# ---------------------------------------------------------------- return_losses
def test_return_losses_answers_the_grpc_doors_losses(
    served: tuple[InProcessServer, Any], client: CoLocatedClient, grpc_client: RouterClient
) -> None:
    server, _ = served
    x = hidden((2, 3, 64), seed=12)
    got = client.route("mixtral", x, layer=1, return_losses=True, skip_cache=True)
    expected = grpc_client.route("mixtral", x, layer=1, return_losses=True,
                          skip_cache=True)
    assert got.info.aux_loss is not None and got.info.z_loss is not None
    assert (got.info.aux_loss, got.info.z_loss) == (expected.info.aux_loss,
                                                    expected.info.z_loss)
    assert_same_answer(got, expected)

    async def over_async() -> RouteResult:
        async with await AsyncCoLocatedClient.connect(server.target, timeout=30) as c:
            return await c.route("mixtral", x, layer=1, return_losses=True, skip_cache=True)

    assert_same_answer(asyncio.run(over_async()), expected)


def test_the_grpc_fallback_passes_input_ids_and_return_losses(
    served: tuple[InProcessServer, Any], grpc_client: RouterClient, tmp_path: Path
) -> None:
    server, _ = served
    absent = tmp_path / "no-door.sock"
    x, ids = hidden((3, D), seed=5), np.array([9, 8, 7], dtype=np.int32)
    expected = grpc_client.route("hashed", x, input_ids=ids, return_losses=True,
                          skip_cache=True)
    with CoLocatedClient(server.target, socket_path=absent, timeout=30) as client:
        assert client.transport == "grpc"
        got = client.route("hashed", x, input_ids=ids, return_losses=True, skip_cache=True)
        assert_same_answer(got, expected)
        with pytest.raises(InvalidArgumentError, match="input_ids: router 'hashed' routes"):
            client.route("hashed", x, skip_cache=True)

    async def fall_back() -> RouteResult:
        async with await AsyncCoLocatedClient.connect(server.target, socket_path=absent) as c:
            assert c.transport == "grpc"
            return await c.route("hashed", x, input_ids=ids, return_losses=True,
                                 skip_cache=True)

    assert_same_answer(asyncio.run(fall_back()), expected)


# ---------------------------------------------------------------- polling for answers
class _PollRecorder:
    """Records the poll budget each route of a real connection was given (the HELLO a
    new connection opens with gives none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.budgets: list[float] = []
        run = colocated_module._Connection.run

        def recording(connection: Any, step: Any, deadline: Any, *spin: float) -> Any:
            if spin:
                self.budgets.append(spin[0])
            return run(connection, step, deadline, *spin)

        monkeypatch.setattr(colocated_module._Connection, "run", recording)


def test_a_lone_call_polls_once_calls_of_its_size_came_back_within_the_budget(
    served: tuple[InProcessServer, Any], grpc_client: RouterClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    polls = _PollRecorder(monkeypatch)
    server, _ = served
    x = hidden((1, 64), seed=3)
    with CoLocatedClient(server.target, timeout=30, spin_us=1_000_000) as client:
        answers = [client.route("mixtral", x, skip_cache=True) for _ in range(3)]
    # no round trip of that size known yet: the first call sleeps; then it polls
    assert polls.budgets == [0.0, 1.0, 1.0]
    for got in answers:  # polled or not, the bits gRPC answers
        assert_same_answer(got, grpc_client.route("mixtral", x, skip_cache=True))


def test_slower_calls_spin_0_and_a_second_call_in_flight_never_poll(
    served: tuple[InProcessServer, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    polls = _PollRecorder(monkeypatch)
    server, _ = served
    x = hidden((1, 64), seed=4)
    with CoLocatedClient(server.target, timeout=30, spin_us=1) as client:
        for _ in range(3):
            client.route("mixtral", x, skip_cache=True)  # no round trip takes 1 us
    with CoLocatedClient(server.target, timeout=30, spin_us=0) as client:
        for _ in range(3):
            client.route("mixtral", x, skip_cache=True)
    with CoLocatedClient(server.target, timeout=30, spin_us=1_000_000) as client:
        client.route("mixtral", x, skip_cache=True)  # the size's round trip is known now
        barrier = threading.Barrier(2)
        original = client._connect

        def connect_in_step() -> Any:  # both calls hold a connection before either sends
            connection = original()
            barrier.wait(timeout=10)
            return connection

        monkeypatch.setattr(client, "_connect", connect_in_step)
        for connection in client._idle:  # each of the two calls opens a connection
            connection.close()
        client._idle.clear()
        threads = [threading.Thread(target=client.route, args=("mixtral", x),
                                    kwargs={"skip_cache": True}) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert polls.budgets[:7] == [0.0] * 7
    # two in flight: the one that started alone may poll, the other sleeps (at most one
    # call of a client polls at a time)
    assert sorted(polls.budgets[7:]) == [0.0, 1.0], polls.budgets


def test_spin_us_must_not_be_negative(served: tuple[InProcessServer, Any]) -> None:
    with pytest.raises(ValueError, match="spin_us must be >= 0"):
        CoLocatedClient(served[0].target, spin_us=-1)
