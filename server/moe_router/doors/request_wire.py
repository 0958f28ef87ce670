"""Zero-copy decoding of RouteRequest: tensor payloads stay views of the received bytes.

protobuf's parser copies every bytes field into the message, and reading ``Tensor.data``
copies it again (upb), so each hidden-state payload was copied twice after gRPC had
received it (64 MiB each time for 4096 tokens of dim 4096). Route and RouteStream
therefore take the raw request: this module walks the top level of the wire format,
decodes the four tensor fields by hand (``dtype``, ``shape``, ``data`` as a memoryview
into the received buffer) and hands every other field to protobuf as a small message
without them. Field numbers come from the generated descriptor, so the proto stays the
one source of truth; a property test checks this decoder against protobuf's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_router_client.v1 import router_pb2 as pb

__all__ = ["TensorView", "RouteRequestView", "parse_route_request", "split_repeated_bytes"]

_REQUEST = pb.RouteRequest.DESCRIPTOR
_TENSOR = pb.Tensor.DESCRIPTOR
#: field number -> name of every Tensor-typed field of RouteRequest
TENSOR_FIELDS: dict[int, str] = {
    f.number: f.name for f in _REQUEST.fields if f.message_type is _TENSOR
}
_DTYPE = _TENSOR.fields_by_name["dtype"].number
_SHAPE = _TENSOR.fields_by_name["shape"].number
_DATA = _TENSOR.fields_by_name["data"].number

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class _Malformed(ValueError):
    """The bytes are not a valid protobuf encoding."""


@dataclass(frozen=True)
class TensorView:
    """A wire Tensor whose ``data`` is a view into the received request (no copy)."""

    dtype: int
    shape: tuple[int, ...]
    data: memoryview


@dataclass(frozen=True)
class RouteRequestView:
    """A decoded RouteRequest: ``message`` holds every field but the tensors.

    ``error`` is set (and the rest empty) when the bytes are not a RouteRequest, so the
    handler can answer INVALID_ARGUMENT instead of gRPC's generic deserialization error.
    ``nbytes``: the size of the received message (what admission control counts).
    """

    message: pb.RouteRequest
    tensors: dict[str, TensorView] = field(default_factory=dict)
    error: str = ""
    nbytes: int = 0


def parse_route_request(raw: bytes) -> RouteRequestView:
    """Decode ``raw`` (a serialized RouteRequest) with tensor payloads left in place."""
    try:
        view = memoryview(raw)
        rest: list[memoryview] = []
        tensors: dict[str, TensorView] = {}
        pos = 0
        while pos < len(view):
            start = pos
            number, wire_type, pos = _tag(view, pos)
            if number in TENSOR_FIELDS and wire_type == _LEN:
                length, pos = _varint(view, pos)
                end = _checked_end(view, pos, length)
                name = TENSOR_FIELDS[number]
                if name in tensors:
                    raise _Malformed(f"{name} appears more than once")
                tensors[name] = _tensor(view[pos:end])
                pos = end
            else:
                pos = _skip(view, pos, wire_type)
                rest.append(view[start:pos])
        message = pb.RouteRequest.FromString(b"".join(rest))
    except Exception as exc:  # any decoding failure is the caller's malformed request
        return RouteRequestView(pb.RouteRequest(), {}, f"malformed RouteRequest: {exc}",
                                len(raw))
    return RouteRequestView(message, tensors, "", len(raw))


def _tensor(view: memoryview) -> TensorView:
    dtype = 0
    shape: list[int] = []
    data = view[0:0]
    pos = 0
    while pos < len(view):
        number, wire_type, pos = _tag(view, pos)
        if number == _DTYPE and wire_type == _VARINT:
            dtype, pos = _varint(view, pos)
            dtype = _signed(dtype)
        elif number == _SHAPE and wire_type == _LEN:  # packed (proto3's default)
            length, pos = _varint(view, pos)
            end = _checked_end(view, pos, length)
            while pos < end:
                dim, pos = _varint(view, pos)
                shape.append(_signed(dim))
            if pos != end:
                raise _Malformed("packed shape overruns its length")
        elif number == _SHAPE and wire_type == _VARINT:  # unpacked, also legal
            dim, pos = _varint(view, pos)
            shape.append(_signed(dim))
        elif number == _DATA and wire_type == _LEN:
            length, pos = _varint(view, pos)
            end = _checked_end(view, pos, length)
            data = view[pos:end]  # last one wins, as protobuf's merge does for bytes
            pos = end
        else:
            pos = _skip(view, pos, wire_type)
    return TensorView(dtype, tuple(shape), data)


def _tag(view: memoryview, pos: int) -> tuple[int, int, int]:
    key, pos = _varint(view, pos)
    number, wire_type = key >> 3, key & 7
    if number == 0:
        raise _Malformed("field number 0")
    return number, wire_type, pos


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view):
            raise _Malformed("truncated varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _signed(value: int) -> int:
    """int64 from its two's-complement varint."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _checked_end(view: memoryview, pos: int, length: int) -> int:
    end = pos + length
    if end > len(view):
        raise _Malformed(f"field of {length} bytes runs past the end of the message")
    return end


def _skip(view: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _varint(view, pos)[1]
    if wire_type == _FIXED64:
        return _checked_end(view, pos, 8)
    if wire_type == _FIXED32:
        return _checked_end(view, pos, 4)
    if wire_type == _LEN:
        length, pos = _varint(view, pos)
        return _checked_end(view, pos, length)
    raise _Malformed(f"unsupported wire type {wire_type}")


def split_repeated_bytes(raw: bytes, number: int) -> tuple[bytes, list[memoryview]]:
    """Views of every payload of the top-level ``bytes`` field ``number`` (in order) and
    the message's other fields re-joined, for protobuf to parse.

    The Open Inference Protocol door uses it for ``raw_input_contents`` (the tensors of a
    ModelInferRequest), as Route does for its tensors. Raises ValueError when the bytes
    are not a valid protobuf encoding.
    """
    view = memoryview(raw)
    rest: list[memoryview] = []
    payloads: list[memoryview] = []
    pos = 0
    while pos < len(view):
        start = pos
        field, wire_type, pos = _tag(view, pos)
        if field == number and wire_type == _LEN:
            length, pos = _varint(view, pos)
            end = _checked_end(view, pos, length)
            payloads.append(view[pos:end])
            pos = end
        else:
            pos = _skip(view, pos, wire_type)
            rest.append(view[start:pos])
    return b"".join(rest), payloads
