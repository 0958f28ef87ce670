"""The co-located door's messages: one datagram each on an ``AF_UNIX`` ``SOCK_SEQPACKET``
socket, shared by the server (``moe_router.doors.colocated``) and the client
(:mod:`moe_router_client.colocated`).

Why its own format and not protobuf: a call is a handful of scalars and references to
shared memory; ``struct`` packs them in about a microsecond and the datagram keeps its
boundaries, so there is no framing. Every message starts with ``kind u8, seq u64``
(little-endian, unpadded); the client picks ``seq`` and the answer repeats it.

    HELLO      version u16, pid u32, api_key str           -> WELCOME | ERROR
    REGISTER   name str, key str, offset u64, byte_size u64 -> OK | ERROR
               (key "" : the region's file descriptor travels with the message,
                SCM_RIGHTS; a sealed memfd, see the client)
    UNREGISTER name str ("" : every region of this connection) -> OK
    DESCRIBE   router str                                  -> DESCRIPTION | ERROR
    ROUTE      flags u8, layer i32, seed i64, timeout_s f64, router str, request_id str,
               output region ref, n u8, n x tensor ref, then the inline bytes
                                                           -> ROUTED | ERROR

ROUTE's flags: 1 return_router_logits, 2 skip_cache, 4 seed set, 8 timeout set,
16 return_losses. A str is ``u16 length`` + UTF-8; a region ref is ``name str, offset
u64, byte_size u64`` (offset from the region's start, Triton's rule). A tensor ref is
``slot u8`` (index in :data:`INPUT_NAMES`), ``dtype u8`` (the wire DType), ``ndim u8``,
``ndim x u64`` dims, ``place u8`` and then: INLINE ``nbytes u64`` (the bytes follow the
refs, in order), REGION a region ref, CUDA_IPC the fields of :class:`CudaIpcRef`.

ROUTED lists each output as ``slot u8`` (index in :data:`OUTPUT_NAMES`), dtype, shape,
``offset u64, nbytes u64`` inside the request's output region, then RoutingInfo's
scalars. The server lays the outputs out in :data:`OUTPUT_NAMES` order, each at a
64-byte aligned offset from the output reference's offset: expert_indices int32
``[T, k]``, expert_weights float32 ``[T, k]``, num_experts_per_token int32 ``[T]``, then
the optional ones the router produced. ERROR carries our status code name
(``INVALID_ARGUMENT``, ...), a message of at most :data:`MAX_ERROR_CHARS` characters, the
ErrorInfo reason, the retry delay (NaN: none) and the request id.
"""

from __future__ import annotations

import functools
import math
import struct
from enum import IntEnum

from moe_router_client.colocated_messages import *  # noqa: F403 - the messages, re-exported
from moe_router_client.colocated_messages import (
    INPUT_NAMES,
    MAX_DIMS,
    MAX_ERROR_CHARS,
    MAX_STRING_BYTES,
    OUTPUT_NAMES,
    CudaIpcRef,
    Describe,
    Description,
    Error,
    Hello,
    Kind,
    Message,
    Ok,
    OutputRef,
    RegionRef,
    Register,
    Route,
    Routed,
    TensorRef,
    Unregister,
    Welcome,
)
from moe_router_client.colocated_messages import __all__ as _MESSAGES

__all__ = [*_MESSAGES, "WireError", "encode", "decode", "restamp_route"]


class _Place(IntEnum):
    INLINE = 0
    REGION = 1
    CUDA_IPC = 2


class WireError(ValueError):
    """A message that cannot be decoded: truncated, unknown kind, out-of-bounds field."""


_HEAD = struct.Struct("<BQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HELLO = struct.Struct("<HI")
_WELCOME = struct.Struct("<HQ")
_SPAN = struct.Struct("<QQ")
_DESCRIPTION = struct.Struct("<IIIII")
_ROUTE = struct.Struct("<BiqdB")  # flags, layer, seed, timeout_s, tensors
_TENSOR = struct.Struct("<BBB")  # slot, dtype, ndim
_CUDA = struct.Struct("<iQQQQB")
_ROUTED = struct.Struct("<BddQQQQQQiB")
_F64 = struct.Struct("<d")

_LOGITS, _SKIP_CACHE, _HAS_SEED, _HAS_TIMEOUT, _LOSSES = 1, 2, 4, 8, 16
_HAS_AUX, _HAS_Z, _CACHE_HIT = 1, 2, 4


# ---------------------------------------------------------------------- writing
@functools.lru_cache(maxsize=256)
def _array(count: int, code: str) -> struct.Struct:
    """The layout of ``count`` little-endian values of ``code`` (made once, kept)."""
    return struct.Struct(f"<{count}{code}")


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > MAX_STRING_BYTES:
        raise WireError(f"a string field holds {len(data)} bytes, at most {MAX_STRING_BYTES}")
    return _U16.pack(len(data)) + data


def _blob(data: bytes) -> bytes:
    if len(data) > MAX_STRING_BYTES:
        raise WireError(f"a bytes field holds {len(data)} bytes, at most {MAX_STRING_BYTES}")
    return _U16.pack(len(data)) + data


def _region(ref: RegionRef) -> bytes:
    return _str(ref.name) + _SPAN.pack(ref.offset, ref.byte_size)


def _dims(shape: tuple[int, ...]) -> bytes:
    return _array(len(shape), "Q").pack(*shape)


def _tensor(ref: TensorRef) -> bytes:
    parts = [_TENSOR.pack(INPUT_NAMES.index(ref.name), ref.dtype, len(ref.shape)),
             _dims(ref.shape)]
    place = ref.place
    if place is None:
        parts.append(_U8.pack(_Place.INLINE) + _U64.pack(memoryview(ref.data).nbytes))
    elif isinstance(place, RegionRef):
        parts.append(_U8.pack(_Place.REGION) + _region(place))
    else:
        parts += [
            _U8.pack(_Place.CUDA_IPC),
            _CUDA.pack(place.device, place.storage_size_bytes, place.storage_offset_bytes,
                       place.tensor_offset, place.ref_counter_offset,
                       int(place.event_sync_required)),
            _array(len(place.stride), "q").pack(*place.stride),
            _blob(place.handle), _blob(place.ref_counter_handle), _blob(place.event_handle),
        ]
    return b"".join(parts)


@functools.lru_cache(maxsize=256)
def _outputs(outputs: tuple[OutputRef, ...]) -> bytes:
    """ROUTED's output refs (kept: a layer's answers lay out the same outputs)."""
    return b"".join(
        _TENSOR.pack(OUTPUT_NAMES.index(out.name), out.dtype, len(out.shape))
        + _dims(out.shape) + _SPAN.pack(out.offset, out.nbytes)
        for out in outputs
    )


def encode(message: Message) -> bytes:
    """The datagram of ``message``."""
    kind = _KIND_OF[type(message)]
    head = _HEAD.pack(kind, message.seq)
    if isinstance(message, Route):
        flags = ((_LOGITS if message.return_router_logits else 0)
                 | (_SKIP_CACHE if message.skip_cache else 0)
                 | (_HAS_SEED if message.seed is not None else 0)
                 | (_HAS_TIMEOUT if message.timeout_s is not None else 0)
                 | (_LOSSES if message.return_losses else 0))
        fixed = _ROUTE.pack(flags, message.layer, message.seed or 0,
                            message.timeout_s or 0.0, len(message.tensors))
        parts: list[bytes | memoryview] = [
            head, fixed, _str(message.router), _str(message.request_id),
            _region(message.output), *(_tensor(t) for t in message.tensors),
        ]
        parts += [t.data for t in message.tensors if t.place is None]
        return b"".join(parts)
    if isinstance(message, Routed):
        flags = ((_HAS_AUX if message.aux_loss is not None else 0)
                 | (_HAS_Z if message.z_loss is not None else 0)
                 | (_CACHE_HIT if message.cache_hit else 0))
        parts = [head, _ROUTED.pack(
            flags, message.aux_loss or 0.0, message.z_loss or 0.0, message.dropped_tokens,
            message.batch_requests, message.batch_tokens, message.queue_time_us,
            message.compute_time_us, len(message.tokens_per_expert), message.layer,
            len(message.outputs),
        ), _array(len(message.tokens_per_expert), "q").pack(*message.tokens_per_expert),
            _str(message.router_version), _str(message.request_id)]
        parts.append(_outputs(message.outputs))
        return b"".join(parts)
    if isinstance(message, Error):
        retry = math.nan if message.retry_after_s is None else message.retry_after_s
        return b"".join((head, _str(message.code), _str(message.message[:MAX_ERROR_CHARS]),
                         _str(message.reason), _F64.pack(retry), _str(message.error),
                         _str(message.request_id)))
    if isinstance(message, Hello):
        return head + _HELLO.pack(message.version, message.pid) + _str(message.api_key)
    if isinstance(message, Welcome):
        return (head + _WELCOME.pack(message.version, message.inline_limit)
                + _str(message.server_version) + _str(message.device))
    if isinstance(message, Register):
        return head + _str(message.name) + _str(message.key) + _SPAN.pack(
            message.offset, message.byte_size)
    if isinstance(message, Unregister):
        return head + _str(message.name)
    if isinstance(message, Describe):
        return head + _str(message.router)
    if isinstance(message, Description):
        return head + _str(message.router) + _DESCRIPTION.pack(
            message.layers, message.input_dim, message.num_experts, message.k_max,
            message.extra_columns)
    return head  # Ok


_ROUTE_FLAGS_AT = _HEAD.size
_ROUTE_TIMEOUT_AT = _HEAD.size + 1 + 4 + 8  # after flags u8, layer i32, seed i64


def restamp_route(datagram: bytes, seq: int, timeout_s: float | None) -> bytearray:
    """A copy of an encoded ROUTE numbered ``seq`` with ``timeout_s``: how a client sends
    a call like one it encoded before without encoding every field again (the
    datagram's other fields are the same bytes)."""
    data = bytearray(datagram)
    _U64.pack_into(data, 1, seq)
    flags = data[_ROUTE_FLAGS_AT] & ~_HAS_TIMEOUT
    data[_ROUTE_FLAGS_AT] = flags | (_HAS_TIMEOUT if timeout_s is not None else 0)
    _F64.pack_into(data, _ROUTE_TIMEOUT_AT, timeout_s or 0.0)
    return data


# ---------------------------------------------------------------------- reading
class _Reader:
    """A cursor over one received datagram; every overrun is a WireError."""

    __slots__ = ("_data", "_at")

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._at = 0

    def take(self, layout: struct.Struct) -> tuple:
        end = self._at + layout.size
        if end > len(self._data):
            raise WireError(f"message truncated at byte {self._at} (of {len(self._data)})")
        values = layout.unpack_from(self._data, self._at)
        self._at = end
        return values

    def raw(self, nbytes: int) -> memoryview:
        end = self._at + nbytes
        if nbytes < 0 or end > len(self._data):
            raise WireError(f"message truncated: {nbytes} bytes wanted at byte {self._at} "
                            f"(of {len(self._data)})")
        view = self._data[self._at:end]
        self._at = end
        return view

    def string(self) -> str:
        (length,) = self.take(_U16)
        try:
            return str(self.raw(length), "utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("a string field is not UTF-8") from exc

    def blob(self) -> bytes:
        (length,) = self.take(_U16)
        return bytes(self.raw(length))

    def region(self) -> RegionRef:
        name = self.string()
        offset, byte_size = self.take(_SPAN)
        return RegionRef(name, offset, byte_size)

    def dims(self, ndim: int, signed: bool = False) -> tuple[int, ...]:
        if ndim > MAX_DIMS:
            raise WireError(f"a tensor has {ndim} dimensions, at most {MAX_DIMS}")
        return self.take(_array(ndim, "q" if signed else "Q"))

    def rest(self) -> int:
        return len(self._data) - self._at


def _slot(names: tuple[str, ...], index: int, what: str) -> str:
    if index >= len(names):
        raise WireError(f"{what} slot {index} is unknown; expected 0..{len(names) - 1}")
    return names[index]


def _read_tensor(r: _Reader) -> tuple[TensorRef, int]:
    """A tensor ref and its inline byte count (-1 when not inline)."""
    slot, dtype, ndim = r.take(_TENSOR)
    name = _slot(INPUT_NAMES, slot, "input")
    shape = r.dims(ndim)
    (place,) = r.take(_U8)
    if place == _Place.INLINE:
        (nbytes,) = r.take(_U64)
        return TensorRef(name, dtype, shape, None), nbytes
    if place == _Place.REGION:
        return TensorRef(name, dtype, shape, r.region()), -1
    if place == _Place.CUDA_IPC:
        device, size, offset, tensor_offset, counter_offset, sync = r.take(_CUDA)
        stride = r.dims(ndim, signed=True)
        ref = CudaIpcRef(device, r.blob(), size, offset, tensor_offset, stride, r.blob(),
                         counter_offset, r.blob(), bool(sync))
        return TensorRef(name, dtype, shape, ref), -1
    raise WireError(f"input '{name}': place {place} is unknown; expected 0, 1 or 2")


_KEPT_ROUTE_BYTES = 2048


def _read_route(seq: int, r: _Reader) -> Route:
    flags, layer, seed, timeout_s, count = r.take(_ROUTE)
    body = r.raw(r.rest())
    kept = _route_refs(count, bytes(body)) if len(body) <= _KEPT_ROUTE_BYTES else None
    router, request_id, output, tensors = (
        kept if kept is not None else _read_route_body(count, _Reader(body)))
    return Route(
        seq, router, layer, output, tensors, request_id,
        return_router_logits=bool(flags & _LOGITS), skip_cache=bool(flags & _SKIP_CACHE),
        seed=seed if flags & _HAS_SEED else None,
        timeout_s=timeout_s if flags & _HAS_TIMEOUT else None,
        return_losses=bool(flags & _LOSSES),
    )


_RouteBody = tuple[str, str, RegionRef, tuple[TensorRef, ...]]


@functools.lru_cache(maxsize=256)
def _route_refs(count: int, body: bytes) -> _RouteBody | None:
    """A ROUTE's body (everything after its fixed fields) when it carries no tensor
    inline, else None. Kept by its bytes: a caller's calls of one layer repeat them
    (read anew: 4 us of the server's decode)."""
    read = _read_route_body(count, _Reader(body))
    return None if any(t.place is None for t in read[3]) else read


def _read_route_body(count: int, r: _Reader) -> _RouteBody:
    """Router, request id, output ref and the ``count`` tensor refs; inline tensors'
    bytes are views of the reader's data."""
    router, request_id, output = r.string(), r.string(), r.region()
    refs = [_read_tensor(r) for _ in range(count)]
    tensors = []
    for ref, nbytes in refs:
        if nbytes >= 0:
            ref = TensorRef(ref.name, ref.dtype, ref.shape, None, r.raw(nbytes))
        tensors.append(ref)
    if r.rest():
        raise WireError(f"{r.rest()} bytes after the end of a ROUTE message")
    return router, request_id, output, tuple(tensors)


def _read_routed(seq: int, r: _Reader) -> Routed:
    (flags, aux, z, dropped, batch_requests, batch_tokens, queue_us, compute_us, experts,
     layer, count) = r.take(_ROUTED)
    counts = r.take(_array(experts, "q"))
    version, request_id = r.string(), r.string()
    outputs = _read_outputs(count, bytes(r.raw(r.rest())))  # they end the message
    return Routed(
        seq, outputs, tuple(counts), dropped, version, bool(flags & _CACHE_HIT),
        batch_requests, batch_tokens, queue_us, compute_us, request_id, layer,
        aux_loss=aux if flags & _HAS_AUX else None, z_loss=z if flags & _HAS_Z else None,
    )


@functools.lru_cache(maxsize=256)
def _read_outputs(count: int, data: bytes) -> tuple[OutputRef, ...]:
    """ROUTED's ``count`` output refs, all of ``data``. Kept by their bytes: a layer's
    answers lay out the same outputs call after call (read anew: 3 us of a 1-token
    call's 6 us decode)."""
    r = _Reader(data)
    outputs = []
    for _ in range(count):
        slot, dtype, ndim = r.take(_TENSOR)
        name = _slot(OUTPUT_NAMES, slot, "output")
        shape = r.dims(ndim)
        offset, nbytes = r.take(_SPAN)
        outputs.append(OutputRef(name, dtype, shape, offset, nbytes))
    if r.rest():
        raise WireError(f"{r.rest()} bytes after the end of a ROUTED message")
    return tuple(outputs)


def decode(data: bytes | memoryview) -> Message:
    """The message in one datagram; inline tensor bytes are views of ``data``.

    Raises :class:`WireError` for a truncated or malformed message (and for trailing
    bytes: each field is accounted for).
    """
    r = _Reader(data)
    kind, seq = r.take(_HEAD)
    message: Message
    if kind == Kind.ROUTE:
        message = _read_route(seq, r)
    elif kind == Kind.ROUTED:
        message = _read_routed(seq, r)
    elif kind == Kind.ERROR:
        code, text, reason = r.string(), r.string(), r.string()
        (retry,) = r.take(_F64)
        message = Error(seq, code, text, reason, None if math.isnan(retry) else retry,
                        r.string(), r.string())
    elif kind == Kind.HELLO:
        version, pid = r.take(_HELLO)
        message = Hello(seq, r.string(), pid, version)
    elif kind == Kind.WELCOME:
        version, inline_limit = r.take(_WELCOME)
        message = Welcome(seq, r.string(), r.string(), inline_limit, version)
    elif kind == Kind.REGISTER:
        name, key = r.string(), r.string()
        message = Register(seq, name, key, *r.take(_SPAN))
    elif kind == Kind.UNREGISTER:
        message = Unregister(seq, r.string())
    elif kind == Kind.DESCRIBE:
        message = Describe(seq, r.string())
    elif kind == Kind.DESCRIPTION:
        message = Description(seq, r.string(), *r.take(_DESCRIPTION))
    elif kind == Kind.OK:
        message = Ok(seq)
    else:
        raise WireError(f"message kind {kind} is unknown; expected one of "
                        f"{[int(k) for k in Kind]}")
    if r.rest():
        raise WireError(f"{r.rest()} bytes after the end of a {Kind(kind).name} message")
    return message


_KIND_OF: dict[type, Kind] = {
    Hello: Kind.HELLO, Welcome: Kind.WELCOME, Register: Kind.REGISTER,
    Unregister: Kind.UNREGISTER, Describe: Kind.DESCRIBE, Description: Kind.DESCRIPTION,
    Route: Kind.ROUTE, Routed: Kind.ROUTED, Error: Kind.ERROR, Ok: Kind.OK,
}


