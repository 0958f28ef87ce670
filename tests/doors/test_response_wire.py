"""The hand-written RouteResponse encoder agrees with protobuf on every answer.

The reference builds the message with protobuf field by field (what the v1 door did
before it wrote the bytes itself); protobuf then parses our bytes, and the two messages
must be equal, field presence included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.chain.backend import RouteCall, RouteOptions, RouteResult
from moe_router.doors.response_wire import _varint, encode_route_response
from moe_router.routing.output import RouterOutput
from moe_router_client.tensors import to_wire
from moe_router_client.v1 import router_pb2 as pb


def reference(result: RouteResult, call: RouteCall) -> pb.RouteResponse:
    """The answer built through protobuf's own message API."""
    out = result.output
    response = pb.RouteResponse(
        expert_indices=to_wire(out.expert_indices),
        expert_weights=to_wire(out.expert_weights),
        num_experts_per_token=to_wire(out.num_experts_per_token),
    )
    info = response.info
    info.SetInParent()
    info.tokens_per_expert.extend(out.tokens_per_expert.tolist())
    info.dropped_tokens = out.dropped_tokens
    info.router_version = result.router_version
    info.cache_hit = result.cache_hit
    info.batch_requests = result.batch_requests
    info.batch_tokens = result.batch_tokens
    info.queue_time_us = result.queue_time_us
    info.compute_time_us = result.compute_time_us
    info.request_id = call.request_id
    info.layer = call.layer
    if out.aux_loss is not None:
        info.aux_loss = float(out.aux_loss)
    if out.z_loss is not None:
        info.z_loss = float(out.z_loss)
    if out.complexity_scores is not None:
        response.complexity_scores.CopyFrom(to_wire(out.complexity_scores.float()))
    if call.options.return_router_logits:
        response.router_logits.CopyFrom(to_wire(out.router_logits.float()))
    if out.dispatch_weights is not None:
        response.dispatch_weights.CopyFrom(to_wire(out.dispatch_weights.float()))
    if out.combine_weights is not None:
        response.combine_weights.CopyFrom(to_wire(out.combine_weights.float()))
    if out.expert_tokens is not None and out.expert_token_weights is not None:
        response.expert_tokens.CopyFrom(to_wire(out.expert_tokens.to(torch.int32)))
        response.expert_token_weights.CopyFrom(to_wire(out.expert_token_weights.float()))
    return response


def _floats(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


@st.composite
def answers(draw: st.DrawFn) -> tuple[RouteResult, RouteCall]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=2)))
    k = draw(st.integers(1, 4))
    experts = draw(st.integers(0, 300))
    big = draw(st.booleans())  # counts past one varint byte, and huge ones
    counts = rng.integers(0, 2**40 if big else 128, size=experts)
    tokens = int(np.prod(lead))
    slots = draw(st.integers(1, 3))

    def maybe(make):
        return make() if draw(st.booleans()) else None

    out = RouterOutput(
        expert_indices=torch.from_numpy(rng.integers(-1, 300, (*lead, k)).astype(np.int32)),
        expert_weights=_floats(rng, *lead, k),
        num_experts_per_token=torch.from_numpy(rng.integers(0, k + 1, lead).astype(np.int32)),
        router_logits=_floats(rng, *lead, max(experts, 1)).to(
            draw(st.sampled_from([torch.float32, torch.bfloat16]))),
        tokens_per_expert=torch.from_numpy(counts.astype(np.int64)),
        dropped_tokens=draw(st.integers(0, 2**40)),
        aux_loss=maybe(lambda: torch.tensor(draw(st.floats(0, 1e30)), dtype=torch.float32)),
        z_loss=maybe(lambda: torch.tensor(draw(st.sampled_from([0.0, 1.5, 3e38])))),
        complexity_scores=maybe(lambda: _floats(rng, *lead)),
        dispatch_weights=maybe(lambda: _floats(rng, tokens, experts * slots)),
        combine_weights=maybe(lambda: _floats(rng, tokens, experts * slots)),
        expert_tokens=maybe(
            lambda: torch.from_numpy(rng.integers(-1, tokens + 1, (experts, 3)))),  # int64
        expert_token_weights=maybe(lambda: _floats(rng, experts, 3)),
    )
    result = RouteResult(
        output=out,
        router_version=draw(st.sampled_from(["", "v1", "sha256:ab12", "ünïcode"])),
        cache_hit=draw(st.booleans()),
        batch_requests=draw(st.integers(0, 2**31 - 1)),
        batch_tokens=draw(st.integers(0, 2**62)),
        queue_time_us=draw(st.integers(0, 2**40)),
        compute_time_us=draw(st.integers(0, 2**40)),
    )
    call = RouteCall(
        router="r",
        layer=draw(st.integers(0, 2**31 - 1)),
        hidden_states=torch.zeros(1, 1),
        options=RouteOptions(return_router_logits=draw(st.booleans())),
        request_id=draw(st.text(max_size=20)),
    )
    return result, call


@settings(max_examples=300, deadline=None)
@given(answer=answers())
def test_encoder_agrees_with_protobuf(answer):
    result, call = answer
    want = reference(result, call)
    got = pb.RouteResponse.FromString(encode_route_response(result, call))
    assert got == want
    assert got.HasField("info")
    assert got.info.HasField("aux_loss") == (result.output.aux_loss is not None)
    assert got.info.HasField("z_loss") == (result.output.z_loss is not None)
    for name in ("complexity_scores", "router_logits", "dispatch_weights", "expert_tokens"):
        assert got.HasField(name) == want.HasField(name), name


def test_a_layer_answer_is_its_heads_and_its_bytes():
    """The tensors' bytes go out as they are: weights decode to the very floats routed."""
    weights = torch.tensor([[0.75, 0.25]], dtype=torch.float32)
    out = RouterOutput(
        expert_indices=torch.tensor([[3, 1]], dtype=torch.int32),
        expert_weights=weights,
        num_experts_per_token=torch.tensor([2], dtype=torch.int32),
        router_logits=torch.zeros(1, 4),
        tokens_per_expert=torch.tensor([0, 1, 0, 1]),
    )
    call = RouteCall(router="r", layer=3, hidden_states=torch.zeros(1, 8), request_id="id-7")
    raw = encode_route_response(RouteResult(out, "v9", batch_tokens=1), call)
    answer = pb.RouteResponse.FromString(raw)
    assert np.frombuffer(answer.expert_weights.data, np.float32).tolist() == [0.75, 0.25]
    assert list(answer.expert_indices.shape) == [1, 2]
    assert (answer.info.layer, answer.info.request_id, answer.info.router_version) == (
        3, "id-7", "v9")
    assert list(answer.info.tokens_per_expert) == [0, 1, 0, 1]
    assert not answer.HasField("router_logits")
    assert raw == encode_route_response(RouteResult(out, "v9", batch_tokens=1), call)


@pytest.mark.parametrize("value", [1, 127, 128, 300, 2**31 - 1, 2**63 - 1, -1, -(2**31)])
def test_varints_as_protobuf_writes_them(value):
    message = pb.RoutingInfo(dropped_tokens=value)
    assert message.SerializeToString() == b"\x20" + _varint(value)
