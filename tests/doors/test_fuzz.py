"""Fuzzing a real `moe-router serve` process: hostile input never gets INTERNAL or UNKNOWN.

Categories, each a hypothesis test (derandomized, ``MOE_ROUTER_FUZZ_EXAMPLES`` examples
each: a few hundred in ``make test``, thousands in ``make fuzz``): random bytes as the
message of every RPC; random protobuf fields; wrong dtype tags; shapes against byte
lengths; zero, negative and overflowing dims; huge claimed shapes with little data;
NaN, Inf and finite extremes in every dtype; unknown routers and layers; every optional
tensor of every router with shapes right and wrong; oversized messages. Each answer's
status is asserted, exactly where one thing is wrong (an oracle written here, apart from
the server's code) and as a set where the input is random; a good request is answered
after each category; the server's resident memory is bounded at the end.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_rpc import SERVICE, Answer, RawCaller, answer_of
from server_process import ServerProcess, small_routers, start_server, write_config

from moe_router_client.v1 import router_pb2 as pb

EXAMPLES = int(os.environ.get("MOE_ROUTER_FUZZ_EXAMPLES", "350"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck), database=None)
MAX_MESSAGE = 1 << 20

EXTRA_ROUTERS = [
    {"name": "attention", "kind": "dynamic", "input_dim": 16, "num_experts": 4,
     "min_experts": 1, "max_experts": 2, "complexity_estimator": "attention_entropy",
     "load_balancing": False, "weights": {"init": "random", "seed": 7}},
    {"name": "perplexity", "kind": "dynamic", "input_dim": 16, "num_experts": 4,
     "min_experts": 1, "max_experts": 2, "complexity_estimator": "perplexity_proxy",
     "load_balancing": False, "weights": {"init": "random", "seed": 8}},
]
#: router -> (input dim, layers, the estimator inputs it reads, the one it requires)
ROUTERS = {
    "mixtral": (64, 2, (), None),
    "deepseek": (32, 1, (), None),
    "expert-choice": (32, 1, (), None),
    "soft": (32, 1, (), None),
    "dynamic": (32, 1, ("gradients",), None),
    "attention": (16, 1, ("attention_weights",), "attention_weights"),
    "perplexity": (16, 1, ("logits",), None),
}
FLOATS = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.BFLOAT16: ml_dtypes.bfloat16}
ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.INT32: 4, pb.INT64: 8}
NEVER = {"INTERNAL", "UNKNOWN", "UNIMPLEMENTED", "CANCELLED", "DEADLINE_EXCEEDED"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        tmp / "config.yaml", small_routers() + EXTRA_ROUTERS, cache={"enabled": False},
        server={"max_message_bytes": MAX_MESSAGE},
    )
    process = start_server(config)
    process.baseline_rss_kib = rss_kib(process)  # type: ignore[attr-defined]
    yield process
    process.terminate()
    assert "Traceback" not in process.log(), process.log()[-5000:]


@pytest.fixture(scope="module")
def raw(server: ServerProcess):
    with RawCaller(server.target, max_message_bytes=8 * MAX_MESSAGE) as caller:
        yield caller


def rss_kib(server: ServerProcess) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def good_request_is_answered(raw: RawCaller) -> None:
    """After each category: the server still routes a good call, with the right shape."""
    x = np.linspace(-1, 1, 5 * 64, dtype=np.float32).reshape(5, 64)
    answer = raw.route(pb.RouteRequest(router="mixtral", layer=1, hidden_states=pb.Tensor(
        dtype=pb.FLOAT32, shape=[5, 64], data=x.tobytes())))
    assert answer.code == "OK", answer
    response = pb.RouteResponse.FromString(answer.response)
    assert list(response.expert_indices.shape) == [5, 2]


CASES = {"count": 0}


def check(answer: Answer, allowed: set[str]) -> None:
    CASES["count"] += 1
    assert answer.code not in NEVER and answer.code in allowed, answer


def tensor_of(values: np.ndarray, dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(values.shape),
                     data=values.astype(FLOATS[dtype]).tobytes())


def ones(shape: tuple[int, ...], dtype: int = pb.FLOAT32) -> pb.Tensor:
    return tensor_of(np.full(shape, 0.25, np.float32), dtype)


routers = st.sampled_from(sorted(ROUTERS))
float_dtypes = st.sampled_from(sorted(FLOATS))


# ----------------------------------------------------------------- random bytes, every RPC
UNARY = {
    "Route": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "Stats": {"OK", "INVALID_ARGUMENT", "NOT_FOUND"},
    "Health": {"OK", "INVALID_ARGUMENT"},
    "ListRouters": {"OK", "INVALID_ARGUMENT"},
}
STANDARD = {
    "/grpc.health.v1.Health/Check": ("unary", {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}),
    "/grpc.health.v1.Health/Watch": ("watch", {"OK", "INVALID_ARGUMENT"}),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ("stream",
                                                                 {"OK", "INVALID_ARGUMENT"}),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (
        "stream", {"OK", "INVALID_ARGUMENT"}),
    SERVICE + "RouteStream": ("stream", {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}),
}


@FUZZ
@given(method=st.sampled_from(sorted(UNARY) + sorted(STANDARD)), junk=st.binary(max_size=300))
def test_random_bytes_as_the_message_of_every_rpc(raw, method, junk):
    if method in UNARY:
        check(raw.call(method, junk, timeout=10), UNARY[method])
        return
    kind, allowed = STANDARD[method]
    try:
        if kind == "unary":
            raw.channel.unary_unary(method)(junk, timeout=10)
        elif kind == "watch":  # a well-formed Watch stays open: read its first answer
            next(iter(raw.channel.unary_stream(method)(junk, timeout=2)))
        else:
            list(raw.channel.stream_stream(method)(iter([junk]), timeout=10))
        code = "OK"
    except StopIteration:
        code = "OK"
    except Exception as exc:  # noqa: BLE001 - grpc.RpcError, its code asserted below
        answer = answer_of(exc)  # type: ignore[arg-type]
        if kind == "watch" and answer.code == "DEADLINE_EXCEEDED":
            return  # the watch did not end by itself: it was well-formed
        code = answer.code
        assert code not in NEVER, answer
    CASES["count"] += 1
    assert code in allowed, (method, code)


def test_a_good_request_after_random_bytes(raw):
    good_request_is_answered(raw)


# ----------------------------------------------------------------- random protobuf fields
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


wire_fields = st.lists(st.tuples(
    st.integers(1, 14),
    st.sampled_from([0, 1, 2, 5]),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.binary(max_size=64),
), max_size=8)


@FUZZ
@given(fields=wire_fields, router=routers)
def test_random_protobuf_fields_in_a_route_request(raw, fields, router):
    message = bytearray(b"\x0a" + _varint(len(router)) + router.encode())
    for number, wire_type, integer, blob in fields:
        message += _varint(number << 3 | wire_type)
        if wire_type == 0:
            message += _varint(integer)
        elif wire_type == 1:
            message += (integer & ((1 << 64) - 1)).to_bytes(8, "little")
        elif wire_type == 5:
            message += (integer & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            message += _varint(len(blob)) + blob
    check(raw.call("Route", bytes(message)), {"OK", "INVALID_ARGUMENT", "NOT_FOUND"})


def test_a_good_request_after_random_fields(raw):
    good_request_is_answered(raw)


# ----------------------------------------------------------------- dtypes, shapes, lengths
@FUZZ
@given(router=routers, dtype=st.integers(-(1 << 31), (1 << 31) - 1), tokens=st.integers(0, 6))
def test_a_wrong_dtype_tag_is_invalid_argument(raw, router, dtype, tokens):
    if dtype in FLOATS:
        dtype = pb.INT32 if dtype % 2 else pb.INT64
    dim = ROUTERS[router][0]
    data = b"\0" * (tokens * dim * ITEMSIZE.get(dtype, 4))
    answer = raw.route(pb.RouteRequest(router=router, hidden_states=pb.Tensor(
        dtype=dtype, shape=[tokens, dim], data=data)))
    check(answer, {"INVALID_ARGUMENT"})
    assert "dtype" in answer.details


def expected_for_shape(router: str, dtype: int, shape: list[int], nbytes: int) -> str:
    """The oracle: the one status a hidden_states of ``shape`` and ``nbytes`` deserves."""
    dim = ROUTERS[router][0]
    if len(shape) > 8 or any(d < 0 for d in shape):
        return "INVALID_ARGUMENT"
    if math.prod(d for d in shape if d) > 1 << 40:
        return "INVALID_ARGUMENT"
    if math.prod(shape) * ITEMSIZE[dtype] != nbytes:
        return "INVALID_ARGUMENT"
    if len(shape) not in (2, 3) or shape[-1] != dim:
        return "INVALID_ARGUMENT"
    if ROUTERS[router][3] is not None:  # the attention router needs attention_weights
        return "INVALID_ARGUMENT"
    return "OK"


dims = st.one_of(
    st.integers(0, 8), st.sampled_from([16, 32, 64]), st.integers(-(1 << 63), -1),
    st.integers(1 << 20, (1 << 63) - 1), st.just(0),
)


@FUZZ
@given(router=routers, dtype=float_dtypes, shape=st.lists(dims, max_size=10),
       extra=st.integers(-16, 16))
def test_shapes_against_byte_lengths_zero_negative_and_overflowing_dims(
    raw, router, dtype, shape, extra
):
    size = math.prod(shape) if shape and all(0 <= d < 1 << 16 for d in shape) else 1
    nbytes = max(0, min(size * ITEMSIZE[dtype] + extra, 1 << 16))
    answer = raw.route(pb.RouteRequest(router=router, hidden_states=pb.Tensor(
        dtype=dtype, shape=shape, data=b"\x11" * nbytes)))
    check(answer, {expected_for_shape(router, dtype, shape, nbytes)})


claims = st.tuples(
    st.lists(st.integers(0, (1 << 63) - 1), max_size=4),
    st.integers(1 << 41, (1 << 63) - 1),
    st.integers(0, 5),
).map(lambda t: [*t[0][: t[2]], t[1], 0, *t[0][t[2]:]][:8])


@FUZZ
@given(router=routers, dtype=float_dtypes, shape=claims)
def test_huge_claimed_shapes_with_no_data_are_invalid_argument(raw, router, dtype, shape):
    answer = raw.route(pb.RouteRequest(router=router, hidden_states=pb.Tensor(
        dtype=dtype, shape=shape, data=b"")))
    check(answer, {"INVALID_ARGUMENT"})
    assert "claims" in answer.details


def test_a_good_request_after_the_shapes(raw):
    good_request_is_answered(raw)


# ----------------------------------------------------------------- values
def expected_for_values(values: np.ndarray) -> set[str]:
    """INVALID_ARGUMENT for any NaN or Inf; OK while the values are moderate; either for
    huge finite values. These per-token routers are judged by their gate logits (finite
    and below 1.8e19): with the fuzz routers' weights (|w_e| < 1) a sum of squares under
    1e36 keeps every logit under 1e18, and beyond that the weights decide."""
    as64 = values.astype(np.float64)
    if not np.isfinite(as64).all():
        return {"INVALID_ARGUMENT"}
    energy = float(np.sum(as64 * as64))
    return {"OK"} if energy < 1e36 else {"OK", "INVALID_ARGUMENT"}


special = st.sampled_from([0.0, -0.0, 1.0, float("nan"), float("inf"), float("-inf"),
                           3.4e38, -3.4e38, 1e19, 2e19, 65504.0, 1e-45, 1e-38, 6e4])


@FUZZ
@given(router=routers.filter(lambda r: ROUTERS[r][3] is None), dtype=float_dtypes,
       tokens=st.integers(1, 5), fill=st.one_of(special, st.floats(width=32)),
       spots=st.lists(st.tuples(st.integers(0, 10_000), special), max_size=4))
def test_nan_inf_and_finite_extremes_in_every_dtype(raw, router, dtype, tokens, fill, spots):
    dim = ROUTERS[router][0]
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.full((tokens, dim), fill, np.float64).astype(FLOATS[dtype])
        flat = values.reshape(-1)
        for where, value in spots:
            flat[where % flat.size] = value
    answer = raw.route(pb.RouteRequest(router=router, hidden_states=pb.Tensor(
        dtype=dtype, shape=[tokens, dim], data=values.tobytes()), return_router_logits=True))
    check(answer, expected_for_values(values))


def test_a_good_request_after_the_values(raw):
    good_request_is_answered(raw)


# ----------------------------------------------------------------- routers and layers
@FUZZ
@given(router=st.one_of(st.text(max_size=200), routers), layer=st.integers(-(1 << 31),
                                                                           (1 << 31) - 1))
def test_unknown_routers_and_layers_are_not_found(raw, router, layer):
    known = router in ROUTERS
    dim = ROUTERS[router][0] if known else 8
    answer = raw.route(pb.RouteRequest(router=router, layer=layer, hidden_states=ones((2, dim))))
    if not router:
        check(answer, {"INVALID_ARGUMENT"})
    elif not known:
        check(answer, {"NOT_FOUND"})
    elif not 0 <= layer < ROUTERS[router][1]:
        check(answer, {"NOT_FOUND"} if ROUTERS[router][3] is None else {"NOT_FOUND",
                                                                          "INVALID_ARGUMENT"})
    else:
        check(answer, {"OK"} if ROUTERS[router][3] is None else {"INVALID_ARGUMENT"})


def test_a_good_request_after_the_names(raw):
    good_request_is_answered(raw)


# ----------------------------------------------------------------- optional tensors
def attention_ok(shape: tuple[int, ...], lead: tuple[int, ...]) -> bool:
    batch, seq = lead[:-1], lead[-1]
    return (len(shape) in (len(lead) + 1, len(lead) + 2) and shape[: len(batch)] == batch
            and shape[-2] == seq and 0 not in shape[len(batch):])


def expected_for_extras(router: str, lead: tuple[int, ...],
                        extras: dict[str, tuple[int, ...]]) -> str:
    dim, _, reads, required = ROUTERS[router]
    if any(name not in reads for name in extras) or (required and required not in extras):
        return "INVALID_ARGUMENT"
    for name, shape in extras.items():
        if name == "gradients" and shape != (*lead, dim):
            return "INVALID_ARGUMENT"
        if name == "logits" and (len(shape) != len(lead) + 1 or shape[:-1] != lead
                                 or shape[-1] < 1):
            return "INVALID_ARGUMENT"
        if name == "attention_weights" and not attention_ok(shape, lead):
            return "INVALID_ARGUMENT"
    return "OK"


small_dims = st.integers(0, 5)


@st.composite
def extra_shapes(draw, lead: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """A shape that is often right for one of the three inputs and often slightly off."""
    batch, seq = lead[:-1], lead[-1]
    choice = draw(st.sampled_from(["hidden", "attention", "attention-heads", "logits", "any"]))
    if choice == "hidden":
        shape = (*lead, dim)
    elif choice == "attention":
        shape = (*batch, seq, draw(st.integers(1, 4)))
    elif choice == "attention-heads":
        shape = (*batch, draw(st.integers(1, 3)), seq, draw(st.integers(1, 4)))
    elif choice == "logits":
        shape = (*lead, draw(st.integers(1, 9)))
    else:
        shape = tuple(draw(st.lists(small_dims, max_size=5)))
    if shape and draw(st.booleans()):  # nudge one dimension
        i = draw(st.integers(0, len(shape) - 1))
        shape = (*shape[:i], max(0, shape[i] + draw(st.sampled_from([-1, 1]))), *shape[i + 1:])
    return shape


@FUZZ
@given(data=st.data(), router=routers, three_d=st.booleans(),
       names=st.sets(st.sampled_from(["attention_weights", "logits", "gradients"])))
def test_every_optional_tensor_of_every_router_with_shapes_right_and_wrong(
    raw, data, router, three_d, names
):
    dim = ROUTERS[router][0]
    lead = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))) if three_d else (
        data.draw(st.integers(1, 6)),)
    shapes = {name: data.draw(extra_shapes(lead, dim)) for name in sorted(names)}
    request = pb.RouteRequest(router=router, hidden_states=ones((*lead, dim)))
    for name, shape in shapes.items():
        getattr(request, name).CopyFrom(ones(shape))
    check(raw.route(request), {expected_for_extras(router, lead, shapes)})


def test_a_good_request_after_the_optional_tensors(raw):
    good_request_is_answered(raw)


# ----------------------------------------------------------------- oversized and memory
@pytest.mark.parametrize("tokens", [MAX_MESSAGE // 256 + 1, 3 * MAX_MESSAGE // 256])
def test_an_oversized_message_is_resource_exhausted(raw, tokens):
    x = np.zeros((tokens, 64), np.float32)  # 256 bytes a token
    answer = raw.route(pb.RouteRequest(router="mixtral", hidden_states=tensor_of(x, pb.FLOAT32)))
    check(answer, {"RESOURCE_EXHAUSTED"})
    good_request_is_answered(raw)


def test_the_servers_memory_stayed_bounded(server):
    """Last in the module: after every category the server holds no more than a small
    multiple of its largest message (it keeps none of the fuzz inputs)."""
    grown_mib = (rss_kib(server) - server.baseline_rss_kib) / 1024  # type: ignore[attr-defined]
    print(f"{CASES['count']} fuzz cases answered as asserted; server RSS grew "
          f"{grown_mib:.0f} MiB over the run")
    assert grown_mib < 200, grown_mib
