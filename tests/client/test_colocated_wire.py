"""The co-located door's wire format: every message survives encode -> decode, and every
malformed datagram is a WireError naming what is wrong (never an IndexError or a read
past the end)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moe_router_client import colocated_wire as wire
from moe_router_client.colocated_session import error_from_message
from moe_router_client.errors import ResourceExhaustedError, UnavailableError

CUDA = wire.CudaIpcRef(0, b"\x01" * 64, 4096, 512, 3, (64, 1), b"/torch_1_2", 128,
                       b"\x02" * 64, True)
MESSAGES = [
    wire.Hello(1, "secret", 4242),
    wire.Welcome(2, "0.1.0", "cuda:0", 65536),
    wire.Register(3, "in", "", 0, 1 << 20),
    wire.Register(4, "keyed", "/my_region", 128, 4096),
    wire.Unregister(5, ""),
    wire.Describe(6, "mixtral"),
    wire.Description(7, "mixtral", 32, 4096, 8, 2, 1),
    wire.Route(8, "mixtral", 3, wire.RegionRef("out", 0, 65536), (
        wire.TensorRef("hidden_states", 3, (2, 5, 64), wire.RegionRef("in", 64, 1280)),
        wire.TensorRef("logits", 1, (1, 2), None, b"\x00" * 8),
        wire.TensorRef("gradients", 1, (2, 64), CUDA),
    ), "req-1", True, True, -5, 0.25),
    wire.Route(9, "r", 0, wire.RegionRef("o", 0, 1),
               (wire.TensorRef("hidden_states", 1, (0, 8), None, b""),)),
    wire.Routed(10, (wire.OutputRef("expert_indices", 4, (2, 5, 2), 0, 80),
                     wire.OutputRef("router_logits", 1, (2, 5, 8), 128, 320)),
                tuple(range(8)), 3, "v1", True, 2, 10, 5, 7, "req-1", 3, 0.5, None),
    wire.Error(11, "UNAVAILABLE", "breaker open", "CIRCUIT_OPEN", 2.5, "CircuitOpenError",
               "req-2"),
    wire.Error(12, "INVALID_ARGUMENT", "bad"),
    wire.Ok(13),
    wire.Route(14, "hashed", 0, wire.RegionRef("out", 0, 4096), (
        wire.TensorRef("hidden_states", 1, (2, 3, 16), wire.RegionRef("in", 0, 384)),
        wire.TensorRef("input_ids", 5, (2, 3), None, bytes(range(48))),
    ), "", return_losses=True),
]


def _same(a: wire.Message, b: wire.Message) -> bool:
    if isinstance(a, wire.Route) and isinstance(b, wire.Route):
        tensors = [(t.name, t.dtype, t.shape, t.place, bytes(t.data)) for t in a.tensors]
        others = [(t.name, t.dtype, t.shape, t.place, bytes(t.data)) for t in b.tensors]
        return tensors == others and a.__dict__.keys() == b.__dict__.keys() and all(
            getattr(a, k) == getattr(b, k) for k in a.__dict__ if k != "tensors")
    return a == b


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_encode_and_decode(message: wire.Message) -> None:
    assert _same(wire.decode(wire.encode(message)), message)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncation_and_every_extra_byte_is_a_wire_error(message: wire.Message) -> None:
    data = wire.encode(message)
    for end in range(len(data)):
        with pytest.raises(wire.WireError):
            wire.decode(data[:end])
    with pytest.raises(wire.WireError, match="after the end"):
        wire.decode(data + b"\x00")


def test_unknown_kinds_slots_places_and_too_many_dims_are_wire_errors() -> None:
    with pytest.raises(wire.WireError, match="kind 99"):
        wire.decode(bytes([99]) + bytes(8))
    route = bytearray(wire.encode(MESSAGES[8]))
    slot_at = len(route) - (3 + 16 + 1 + 8)  # slot, dtype, ndim | 2 dims | place | nbytes
    route[slot_at] = 9
    with pytest.raises(wire.WireError, match="input slot 9"):
        wire.decode(bytes(route))
    route[slot_at] = 0
    route[slot_at + 3 + 16] = 7
    with pytest.raises(wire.WireError, match="place 7"):
        wire.decode(bytes(route))
    route[slot_at + 3 + 16] = 0
    route[slot_at + 2] = 60
    with pytest.raises(wire.WireError, match="60 dimensions"):
        wire.decode(bytes(route))


def test_strings_are_bounded_and_error_messages_cut() -> None:
    with pytest.raises(wire.WireError, match="at most"):
        wire.encode(wire.Describe(1, "x" * (wire.MAX_STRING_BYTES + 1)))
    long = wire.decode(wire.encode(wire.Error(1, "INTERNAL", "y" * 5000)))
    assert isinstance(long, wire.Error) and len(long.message) == wire.MAX_ERROR_CHARS


def test_error_answers_become_the_client_error_classes() -> None:
    error = error_from_message(wire.Error(1, "UNAVAILABLE", "open", "CIRCUIT_OPEN", 2.5,
                                          "CircuitOpenError", "rid"))
    assert isinstance(error, UnavailableError)
    assert (error.reason, error.retry_after_s, error.request_id) == ("CIRCUIT_OPEN", 2.5, "rid")
    exhausted = error_from_message(wire.Error(2, "RESOURCE_EXHAUSTED", "slow down"))
    assert isinstance(exhausted, ResourceExhaustedError) and exhausted.retry_after_s is None


def test_output_bound_covers_the_layout_the_server_writes() -> None:
    description = wire.Description(1, "soft", 1, 32, 4, 2, 1 + 2 * 4 * 2)
    for tokens in (0, 1, 7, 1000):
        sizes = [4 * tokens * c for c in (2, 2, 1, 1, 4, 8, 8)]  # every output at once
        at = 0
        for size in sizes:
            at = wire.aligned(at + size)
        assert wire.output_bytes_bound(tokens, description, True) >= at
    assert wire.aligned(1) == 64 and wire.aligned(64) == 64 and wire.aligned(0) == 0
    assert math.isfinite(wire.output_bytes_bound(3, description, False))


@pytest.mark.parametrize("message", [m for m in MESSAGES if isinstance(m, wire.Route)],
                         ids=lambda m: f"route{m.seq}")
@pytest.mark.parametrize("before", [None, 0.5])
@pytest.mark.parametrize("after", [None, 0.0, 0.25, 3600.0])
def test_a_restamped_route_is_that_route_encoded_with_its_seq_and_timeout(
    message: wire.Route, before: float | None, after: float | None
) -> None:
    template = wire.encode(dataclasses.replace(message, seq=0, timeout_s=before))
    expected = wire.encode(dataclasses.replace(message, seq=2**40 + 7, timeout_s=after))
    assert wire.restamp_route(template, 2**40 + 7, after) == expected
    assert wire.decode(wire.restamp_route(template, 5, after)).timeout_s == after
