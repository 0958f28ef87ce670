"""A co-located session's ROUTE datagrams: a call like an earlier one sends that call's
datagram again with its own seq and timeout, and every datagram says exactly what a
fresh encoding of its call would (driven without a server: the session is I/O-free)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moe_router_client import colocated_wire as wire
from moe_router_client.colocated_session import MemfdRegion, Session, Step
from moe_router_client.colocated_shared import SharedBuffers, shared_array
from moe_router_client.errors import RouterError
from moe_router_client.v1 import router_pb2 as pb

DESCRIPTION = wire.Description(0, "mixtral", 4, 64, 8, 2, 1)


def _drive(step: Step, sent: list[wire.Message]) -> Any:
    """Run ``step``, answering REGISTER / UNREGISTER with OK and ROUTE with a ROUTED of one
    token's outputs; every request decoded into ``sent`` (a REGISTER's descriptor stays
    the session's, which closes it once answered)."""
    answer: wire.Message | None = None
    while True:
        try:
            data, fds = step.send(answer) if answer is not None else next(step)
        except StopIteration as done:
            return done.value
        message = wire.decode(data)
        sent.append(message)
        if isinstance(message, wire.Route):
            answer = wire.Routed(message.seq, (
                wire.OutputRef("expert_indices", pb.INT32, (1, 2), 0, 8),
                wire.OutputRef("expert_weights", pb.FLOAT32, (1, 2), 64, 8),
                wire.OutputRef("num_experts_per_token", pb.INT32, (1,), 128, 4),
            ), (0,) * 8, 0, "v1", False, 1, 1, 0, 3, "rid", message.layer)
        else:
            answer = wire.Ok(message.seq)


@pytest.fixture
def session() -> Any:
    s = Session(None, {"mixtral": DESCRIPTION})
    s.welcome = wire.Welcome(0, "0.1.0", "cpu", 65536)
    yield s
    s.close()


def _route(session: Session, hidden: Any, layer: int, *, timeout: float | None = None,
           shared: SharedBuffers | None = None, **options: Any) -> wire.Route:
    arguments: dict[str, Any] = dict(
        extra_inputs={}, input_ids=None, return_router_logits=False, return_losses=False,
        skip_cache=False, seed=None, request_id=None, as_torch=False)
    arguments.update(options)
    sent: list[wire.Message] = []
    _drive(session.route("mixtral", hidden, layer, timeout_s=lambda: timeout,
                         shared=shared, **arguments), sent)
    (route,) = [m for m in sent if isinstance(m, wire.Route)]
    return route


def test_repeated_calls_send_their_own_seq_layer_timeout_and_options(session: Session) -> None:
    hidden = np.ones((1, 64), np.float32)
    calls = [
        dict(layer=0), dict(layer=3, timeout=0.25), dict(layer=0, timeout=None),
        dict(layer=3, timeout=7.0), dict(layer=0, skip_cache=True, seed=11),
        dict(layer=0, return_losses=True, timeout=1.5), dict(layer=0, request_id="mine"),
        dict(layer=0, return_router_logits=True), dict(layer=0),
    ]
    routes = [_route(session, hidden, **call) for call in calls]
    assert [r.seq for r in routes] == sorted({r.seq for r in routes})  # each its own
    for route, call in zip(routes, calls, strict=True):
        assert route.layer == call["layer"]
        assert route.timeout_s == call.get("timeout")
        assert route.skip_cache is call.get("skip_cache", False)
        assert route.seed == call.get("seed")
        assert route.return_losses is call.get("return_losses", False)
        assert route.return_router_logits is call.get("return_router_logits", False)
        assert route.request_id == call.get("request_id", "")
        (tensor,) = route.tensors
        assert (tensor.name, tensor.shape) == ("hidden_states", (1, 64))
        assert tensor.place == wire.RegionRef(session.inputs.name, 0, 256)  # type: ignore[union-attr]
        assert route.output.name == session.outputs.name  # type: ignore[union-attr]


def test_a_grown_region_or_another_shape_is_named_in_the_next_datagram(
    session: Session,
) -> None:
    small = _route(session, np.ones((1, 64), np.float32), 0)
    large = _route(session, np.ones((3000, 64), np.float32), 0)  # both regions grow
    again = _route(session, np.ones((1, 64), np.float32), 0)
    assert large.tensors[0].place.name != small.tensors[0].place.name  # type: ignore[union-attr]
    assert large.output.name != small.output.name
    assert again.tensors[0].place.name == large.tensors[0].place.name  # type: ignore[union-attr]
    assert again.output == large.output
    assert (small.tensors[0].shape, large.tensors[0].shape) == ((1, 64), (3000, 64))


def test_a_shared_buffer_is_referenced_where_the_input_lies(session: Session) -> None:
    shared = SharedBuffers()
    region = MemfdRegion(shared.new_name(), 4096)
    shared.add(region)
    buffer = shared_array(region.mapping, (4, 64), np.float32)
    first = _route(session, buffer[1:2], 0, shared=shared)
    second = _route(session, buffer[2:3], 0, shared=shared)
    copied = _route(session, np.ones((1, 64), np.float32), 0, shared=shared)
    assert first.tensors[0].place == wire.RegionRef(region.name, 256, 256)
    assert second.tensors[0].place == wire.RegionRef(region.name, 512, 256)
    assert copied.tensors[0].place.name == session.inputs.name  # type: ignore[union-attr]
    del buffer
    shared.close()


def _written_answer(region: MemfdRegion, refs: tuple[wire.OutputRef, ...]) -> wire.Routed:
    return wire.Routed(1, refs, (1, 0, 1, 0), 0, "v1", False, 1, 1, 0, 3, "rid", 0)


def test_the_answer_is_read_out_of_the_region_once_and_checked() -> None:
    """The outputs are copied out of the reused region (a later call's answer does not
    change them), by the dtype and shape the answer names, through numpy or torch."""
    torch = pytest.importorskip("torch")
    region = MemfdRegion("answers", 1 << 16)
    try:
        indices = np.array([[3, 1], [0, 2]], np.int32)
        weights = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
        region.bytes[0:16] = indices.view(np.uint8).reshape(-1)
        region.bytes[64:80] = weights.view(np.uint8).reshape(-1)
        region.bytes[128:136] = np.array([2, 2], np.int32).view(np.uint8)
        refs = (wire.OutputRef("expert_indices", pb.INT32, (2, 2), 0, 16),
                wire.OutputRef("expert_weights", pb.FLOAT32, (2, 2), 64, 16),
                wire.OutputRef("num_experts_per_token", pb.INT32, (2,), 128, 8))
        got = Session._result(_written_answer(region, refs), region, False)
        region.bytes[:200] = 0  # the next call's answer
        assert np.array_equal(got.expert_indices, indices) and got.expert_indices.dtype == np.int32
        assert np.array_equal(got.expert_weights, weights)
        assert got.num_experts_per_token.tolist() == [2, 2]
        assert not got.expert_weights.flags.writeable  # as every decoded answer
        assert got.info.tokens_per_expert == [1, 0, 1, 0] and got.info.compute_time_us == 3
        region.bytes[64:80] = weights.view(np.uint8).reshape(-1)
        as_torch = Session._result(_written_answer(region, refs), region, True)
        assert as_torch.expert_weights.dtype == torch.float32
        assert as_torch.expert_weights.tolist() == weights.tolist()
        outside = (refs[0], refs[1], wire.OutputRef("num_experts_per_token", pb.INT32, (2,),
                                                    region.size - 4, 8))
        with pytest.raises(RouterError, match="outside the .*-byte output region"):
            Session._result(_written_answer(region, outside), region, False)
        short = (wire.OutputRef("expert_indices", pb.INT32, (2, 2), 0, 8), *refs[1:])
        with pytest.raises(ValueError, match="holds 8 bytes, expected 16"):
            Session._result(_written_answer(region, short), region, False)
    finally:
        region.close()
