"""encode_route_request writes the bytes of build_route_request(...).SerializeToString()
as protobuf reads them, whatever the arrays and options."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router_client.client import build_route_request
from moe_router_client.request_encoding import encode_route_request
from moe_router_client.v1 import router_pb2 as pb

NUMPY_DTYPES = [np.float32, np.float16, np.int32, np.int64, ml_dtypes.bfloat16]


@st.composite
def arrays(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
    array = (values * 100).astype(dtype)
    if draw(st.booleans()) and array.ndim >= 2:
        array = array.swapaxes(0, 1)  # non-contiguous input
    return array


@settings(max_examples=150, deadline=None)
@given(
    hidden=arrays(),
    extras=st.dictionaries(st.sampled_from(["attention_weights", "logits", "gradients"]),
                           arrays()),
    layer=st.integers(-(2**31), 2**31 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1),
    flags=st.tuples(st.booleans(), st.booleans()),
    request_id=st.none() | st.text(max_size=8),
)
def test_encoded_request_decodes_to_the_built_message(hidden, extras, layer, seed, flags,
                                                     request_id):
    kwargs = dict(layer=layer, seed=seed, return_router_logits=flags[0], skip_cache=flags[1],
                  request_id=request_id, **extras)
    encoded = encode_route_request("mixtral", hidden, **kwargs)
    assert pb.RouteRequest.FromString(encoded) == build_route_request("mixtral", hidden, **kwargs)


def test_torch_tensors_encode_like_the_codec():
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)[:, ::2]  # a strided bf16 view
    gradients = torch.randn(3, 4)
    encoded = encode_route_request("r", hidden, gradients=gradients)
    decoded = pb.RouteRequest.FromString(encoded)
    assert decoded == build_route_request("r", hidden, gradients=gradients)
    assert decoded.hidden_states.dtype == pb.BFLOAT16
    assert list(decoded.hidden_states.shape) == [3, 4]


def test_bad_arguments_are_refused_like_build_route_request():
    with pytest.raises(ValueError, match="router"):
        encode_route_request("", np.zeros((1, 2), np.float32))
    with pytest.raises(TypeError):
        encode_route_request("r", [[1.0, 2.0]])


def test_kept_heads_carry_only_what_the_call_repeats():
    # the same router, options and shape call after call: each call its own payload
    first, second = (np.full((2, 3), value, np.float32) for value in (1.0, 2.0))
    for hidden in (first, second, first):
        encoded = encode_route_request("r", hidden, layer=3, skip_cache=True)
        assert pb.RouteRequest.FromString(encoded) == build_route_request(
            "r", hidden, layer=3, skip_cache=True)
    # another shape, another layer, a request id: each decodes to its own message
    for kwargs in (dict(layer=4), dict(layer=3, request_id="call-7"), dict(layer=3, seed=9)):
        wide = np.ones((1, 5), np.float32)
        assert pb.RouteRequest.FromString(encode_route_request("r", wide, **kwargs)) == \
            build_route_request("r", wide, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(seed=1.5), dict(skip_cache="yes"), dict(layer=True),
                                    dict(layer=1.0)])
def test_values_protobuf_refuses_stay_refused_after_their_equals_were_kept(kwargs):
    hidden = np.zeros((1, 2), np.float32)
    encode_route_request("r", hidden, seed=1, skip_cache=True, layer=1)  # kept: 1 == True
    with pytest.raises(TypeError):
        build_route_request("r", hidden, **kwargs)
    with pytest.raises(TypeError):
        encode_route_request("r", hidden, **kwargs)
