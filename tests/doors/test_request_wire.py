"""The zero-copy RouteRequest decoder agrees with protobuf's parser on every request."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.doors.request_wire import TENSOR_FIELDS, parse_route_request
from moe_router_client.tensors import from_parts, from_wire
from moe_router_client.v1 import router_pb2 as pb

tensors = st.builds(
    pb.Tensor,
    dtype=st.sampled_from([0, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.INT32, pb.INT64, 99]),
    shape=st.lists(st.integers(-(2**40), 2**40), max_size=4),
    data=st.binary(max_size=64),
)
requests = st.builds(
    pb.RouteRequest,
    router=st.text(max_size=12),
    layer=st.integers(-(2**31), 2**31 - 1),
    return_router_logits=st.booleans(),
    skip_cache=st.booleans(),
    request_id=st.text(max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(
    request=requests,
    seed=st.none() | st.integers(0, 2**64 - 1),
    present=st.dictionaries(st.sampled_from(sorted(TENSOR_FIELDS.values())), tensors),
)
def test_decoder_agrees_with_protobuf(request, seed, present):
    if seed is not None:
        request.seed = seed
    for name, tensor in present.items():
        getattr(request, name).CopyFrom(tensor)
    raw = request.SerializeToString()
    view = parse_route_request(raw)
    assert view.error == ""
    reference = pb.RouteRequest.FromString(raw)
    for name in TENSOR_FIELDS.values():
        assert (name in view.tensors) == reference.HasField(name)
        if name in view.tensors:
            got, want = view.tensors[name], getattr(reference, name)
            assert (got.dtype, got.shape, bytes(got.data)) == (
                want.dtype, tuple(want.shape), want.data)
            reference.ClearField(name)
    assert view.message == reference


def test_payload_is_a_view_of_the_received_bytes_not_a_copy():
    hidden = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = pb.RouteRequest(
        router="r", hidden_states=pb.Tensor(dtype=pb.FLOAT32, shape=[3, 4], data=hidden.tobytes())
    ).SerializeToString()
    tensor = parse_route_request(raw).tensors["hidden_states"]
    assert tensor.data.obj is raw
    decoded = from_parts(tensor.dtype, tensor.shape, tensor.data)
    np.testing.assert_array_equal(decoded, hidden)
    np.testing.assert_array_equal(
        decoded, from_wire(pb.RouteRequest.FromString(raw).hidden_states))


def test_unpacked_shape_and_unknown_fields_are_accepted():
    # shape as unpacked varints (field 2, wire type 0) and an unknown field 15 in Tensor
    tensor = b"\x08\x01" + b"\x10\x02" + b"\x10\x01" + b"\x78\x05" + b"\x1a\x08" + bytes(8)
    raw = b"\x0a\x01r" + b"\x1a" + bytes([len(tensor)]) + tensor
    view = parse_route_request(raw)
    assert view.error == ""
    assert view.tensors["hidden_states"].shape == (2, 1)
    assert view.tensors["hidden_states"].data.nbytes == 8


def test_malformed_bytes_give_an_error_not_an_exception():
    good = pb.RouteRequest(
        router="mixtral", hidden_states=pb.Tensor(dtype=1, shape=[1, 2], data=bytes(8))
    ).SerializeToString()
    for raw in (good[:-3], good[:5], b"\xff" * 11, b"\x1b", b"\x00\x01"):
        view = parse_route_request(raw)
        assert view.error.startswith("malformed RouteRequest:"), raw
    twice = good + good[good.index(b"\x1a"):]
    assert "hidden_states appears more than once" in parse_route_request(twice).error
