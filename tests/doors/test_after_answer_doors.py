"""Every door sends the answer before the chain records it (``AfterAnswer``), and the
records still land before anything the caller does next: the real server, real calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
from inprocess_server import InProcessServer, serve_in_process
from oip_calls import infer_input
from server_process import small_routers, write_config

from moe_router.chain.request_stats import RequestStatsBackend
from moe_router_client import CoLocatedClient, RouterClient

#: How long a held record waits for the caller to have its answer. Passing it means
#: the door held the answer behind the record.
HOLD_S = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    routers = [r for r in small_routers() if r["name"] == "mixtral"]
    config = write_config(tmp_path_factory.mktemp("after") / "config.yaml", routers,
                          cache={"enabled": False})
    with serve_in_process(config) as running:
        yield running


def _hidden(seed: int) -> np.ndarray:
    dim = next(r for r in small_routers() if r["name"] == "mixtral")["input_dim"]
    return np.random.default_rng(seed).standard_normal((3, dim), dtype=np.float32)


def _grpc(server: InProcessServer, x: np.ndarray) -> None:
    with RouterClient(server.target, timeout=HOLD_S * 2) as client:
        assert client.route("mixtral", x).expert_indices.shape == (3, 2)


def _oip(server: InProcessServer, x: np.ndarray) -> None:
    with triton.InferenceServerClient(server.target) as client:
        answer = client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                              client_timeout=HOLD_S * 2)
        assert answer.as_numpy("expert_indices").shape == (3, 2)


def _colocated(server: InProcessServer, x: np.ndarray) -> None:
    with CoLocatedClient(server.target, timeout=HOLD_S * 2) as client:
        assert client.transport == "colocated"
        assert client.route("mixtral", x).expert_indices.shape == (3, 2)


def _requests(server: InProcessServer) -> int:
    with RouterClient(server.target, timeout=30) as client:
        return client.stats("mixtral")[0].requests


@pytest.mark.parametrize("call", [_grpc, _oip, _colocated], ids=["route", "oip", "colocated"])
def test_the_answer_goes_out_before_the_chain_records_it(
        server: InProcessServer, monkeypatch: pytest.MonkeyPatch,
        call: Callable[[InProcessServer, np.ndarray], None]) -> None:
    answered, recorded = threading.Event(), threading.Event()
    held: list[bool] = []
    record = RequestStatsBackend._record_answer

    def held_record(self: RequestStatsBackend, *args: object) -> None:
        # On the server's loop: the caller has its answer only if it was sent first.
        held.append(answered.wait(HOLD_S))
        record(self, *args)
        recorded.set()

    before = _requests(server)
    monkeypatch.setattr(RequestStatsBackend, "_record_answer", held_record)
    call(server, _hidden(0))
    answered.set()
    assert recorded.wait(HOLD_S)
    monkeypatch.undo()
    assert held == [True], "the record ran before the caller had its answer"
    # The record ran before the Stats call that came after the answer.
    assert _requests(server) == before + 1


def test_a_record_that_fails_leaves_the_answer_and_the_server_alone(
        server: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_record(self: RequestStatsBackend, *args: object) -> None:
        raise RuntimeError("request figures are broken")

    monkeypatch.setattr(RequestStatsBackend, "_record_answer", broken_record)
    for call in (_grpc, _oip, _colocated):
        call(server, _hidden(1))
    # The records run once each answer is out, so the last may still be running when
    # its caller already has the answer: wait for it (bounded), then judge.
    deadline = time.monotonic() + HOLD_S
    while (server.log().count("recording an answered call failed") < 3
           and time.monotonic() < deadline):
        time.sleep(0.01)
    monkeypatch.undo()
    assert server.log().count("recording an answered call failed") == 3
    assert "request figures are broken" in server.log()
    before = _requests(server)
    _grpc(server, _hidden(2))
    assert _requests(server) == before + 1
