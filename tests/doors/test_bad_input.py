"""A caller's bad input over real gRPC: INVALID_ARGUMENT (or NOT_FOUND), never INTERNAL,
never counted by the breaker; error text bounded; every INTERNAL answer carries a request
id; undecodable bytes are INVALID_ARGUMENT on every method; reflection v1 and v1alpha."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from inprocess_server import serve_in_process
from raw_rpc import RawCaller, f32, tensor
from server_process import clean_env, small_routers, write_config

from moe_router_client import RouterClient
from moe_router_client.v1 import router_pb2 as pb

EXTRA_ROUTERS = [
    {"name": "attention", "kind": "dynamic", "input_dim": 16, "num_experts": 4,
     "min_experts": 1, "max_experts": 2, "complexity_estimator": "attention_entropy",
     "load_balancing": False, "weights": {"init": "random", "seed": 7}},
    {"name": "perplexity", "kind": "dynamic", "input_dim": 16, "num_experts": 4,
     "min_experts": 1, "max_experts": 2, "complexity_estimator": "perplexity_proxy",
     "load_balancing": False, "weights": {"init": "random", "seed": 8}},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bad-input")
    config = write_config(
        tmp / "config.yaml", small_routers(fault_dir=tmp) + EXTRA_ROUTERS,
        testing={"enable_fault_injection": True}, cache={"enabled": False},
        server={"max_message_bytes": 8 << 20},
    )
    with serve_in_process(config) as server:
        yield server, tmp


@pytest.fixture()
def raw(served):
    server, _ = served
    with RawCaller(server.target) as caller:
        yield caller


def breaker_state(server, router: str) -> tuple[str, int]:
    figures = server.running.chains[router].figures()
    return figures.breaker.state.value, figures.requests.failures


def request(router: str, hidden: pb.Tensor, **fields) -> pb.RouteRequest:
    return pb.RouteRequest(router=router, hidden_states=hidden, **fields)


CALLER_MISTAKES = {
    "gradients of another shape": request(
        "dynamic", f32([2, 3, 32]), gradients=f32([2, 3, 31])),
    "gradients of another rank": request("dynamic", f32([6, 32]), gradients=f32([2, 3, 32])),
    "hidden states finite but huge": request("dynamic", f32([4, 32], 3e38)),
    "top-k hidden states finite but huge": request("mixtral", f32([4, 64], 3e38)),
    "grouped hidden states finite but huge": request("deepseek", f32([4, 32], 3e38)),
    "attention_weights of a wrong shape": request(
        "attention", f32([2, 3, 16]), attention_weights=f32([2, 4, 3, 5, 1])),
    "attention_weights of another seq": request(
        "attention", f32([2, 3, 16]), attention_weights=f32([2, 4, 4, 3])),
    "attention_weights missing": request("attention", f32([2, 3, 16])),
    "attention_weights negative": request(
        "attention", f32([1, 3, 16]), attention_weights=f32([1, 3, 3], -0.5)),
    "attention_weights huge": request(
        "attention", f32([1, 3, 16]), attention_weights=f32([1, 3, 3], 3e38)),
    "attention_weights integer": request(
        "attention", f32([1, 3, 16]),
        attention_weights=tensor(pb.INT32, [1, 3, 3], b"\0" * 36)),
    "logits to a gradient_norm router": request("dynamic", f32([3, 32]), logits=f32([3, 10])),
    "logits of a wrong shape": request("perplexity", f32([3, 16]), logits=f32([4, 10])),
    "logits with NaN": request("perplexity", f32([3, 16]), logits=f32([3, 10], float("nan"))),
    "gradients to a top-k router": request("mixtral", f32([3, 64]), gradients=f32([3, 64])),
    "empty tensor claiming [2^62, 2^62, 0]": request(
        "mixtral", tensor(pb.FLOAT32, [2**62, 2**62, 0], b"")),
    "empty tensor claiming [2^63-1, 0, 4096]": request(
        "mixtral", tensor(pb.FLOAT32, [2**63 - 1, 0, 4096], b"")),
    "5,000 dimensions": request("mixtral", tensor(pb.FLOAT32, [1] * 5000, b"\0" * 4)),
    "request id of 10,000 characters": request("mixtral", f32([2, 64]), request_id="r" * 10_000),
}


@pytest.mark.parametrize("name", sorted(CALLER_MISTAKES))
def test_a_callers_mistake_is_invalid_argument_and_never_opens_the_breaker(served, raw, name):
    server, _ = served
    bad = CALLER_MISTAKES[name]
    before = breaker_state(server, bad.router)
    for _ in range(15):  # more than the breaker's minimum_number_of_calls (10)
        answer = raw.route(bad)
        assert answer.code == "INVALID_ARGUMENT", answer
        assert answer.reason == "INVALID_INPUT", answer
    assert breaker_state(server, bad.router) == ("CLOSED", before[1])
    good = raw.route(request("mixtral", f32([2, 64])))
    assert good.code == "OK", good


def test_messages_say_what_was_wrong_and_what_was_expected(raw):
    details = {name: raw.route(bad).details for name, bad in CALLER_MISTAKES.items()}
    assert "gradients must have the shape of hidden_states [2, 3, 32], got [2, 3, 31]" in (
        details["gradients of another shape"])
    assert "too large to route in float32" in details["hidden states finite but huge"]
    assert "needs attention_weights" in details["attention_weights missing"]
    assert "does not read logits; it reads gradients" in details["logits to a gradient_norm router"]
    assert "claims" in details["empty tensor claiming [2^62, 2^62, 0]"]
    assert "at most 8" in details["5,000 dimensions"]
    assert "at most 128 printable characters" in details["request id of 10,000 characters"]


def test_an_unknown_100000_character_router_is_not_found_with_a_bounded_message(raw):
    answer = raw.route(request("x" * 100_000, f32([2, 64])))
    assert answer.code == "NOT_FOUND", answer.code
    assert len(answer.details.encode()) <= 1024 + 64
    assert answer.details.startswith("unknown router 'xxx")
    assert "bytes cut" in answer.details and "this server hosts" in answer.details


def test_a_shape_of_5000_dimensions_in_stats_router_name_is_bounded_too(raw):
    answer = raw.call("Stats", pb.StatsRequest(router="é" * 50_000).SerializeToString())
    assert answer.code == "NOT_FOUND" and len(answer.details.encode()) <= 1024 + 64


UNDECODABLE = [b"\xff", b"\x0a\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
               b"\x0b", b"\x12\xff\xff\xff\xff\x0f"]


@pytest.mark.parametrize("method", ["Route", "Stats", "Health", "ListRouters"])
def test_undecodable_bytes_are_invalid_argument_on_every_method(raw, method):
    for junk in UNDECODABLE:
        answer = raw.call(method, junk)
        assert answer.code == "INVALID_ARGUMENT", (method, junk, answer)
        assert "malformed" in answer.details
    assert raw.call(method, b"").code in ("OK", "INVALID_ARGUMENT")  # empty = defaults


def test_internal_errors_carry_a_request_id_in_the_answer_and_the_log(served, raw):
    server, tmp = served
    (tmp / "fail").touch()
    try:
        chosen = raw.route(request("faulty", f32([2, 16]), request_id="mine-1", skip_cache=True))
        made_up = raw.route(request("faulty", f32([2, 16]), skip_cache=True))
    finally:
        (tmp / "fail").unlink()
    for answer in (chosen, made_up):
        assert answer.code == "INTERNAL", answer
        request_id = answer.metadata["request_id"]
        assert f"(request id {request_id})" in answer.details
        assert f"internal error (request id {request_id})" in server.log()
    assert chosen.metadata["request_id"] == "mine-1"
    assert len(made_up.metadata["request_id"]) == 16


def test_reflection_answers_under_v1_and_v1alpha(served):
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            listed, described = call(iter([
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            ]), timeout=10)
            names = {s.name for s in listed.list_services_response.service}
            assert {"moe_router.v1.RouterService", "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names, version
            assert described.WhichOneof("message_response") == "file_descriptor_response"


def test_a_taken_grpc_port_prints_only_our_one_line(served, tmp_path: Path):
    import subprocess
    import sys

    server, _ = served
    config = write_config(tmp_path / "second.yaml", small_routers()[:1],
                          server={"port": server.port})
    out = subprocess.run([sys.executable, "-m", "moe_router", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "server.port: could not listen on" in lines[0], out.stderr


def test_the_client_sees_the_bounded_not_found_not_a_header_overflow(served):
    server, _ = served
    from moe_router_client.errors import NotFoundError

    with RouterClient(server.target, timeout=10, retries=0) as client:
        with pytest.raises(NotFoundError) as raised:
            client.route("y" * 100_000, np.ones((2, 64), np.float32))
        assert "this server hosts" in raised.value.details
