"""One co-located connection's state and the exchanges it makes, without I/O: the sync and
asyncio clients (:mod:`moe_router_client.colocated`) drive the same steps.

A session owns two regions, one for inputs and one for outputs, each a memfd
(``memfd_create``: no name in ``/dev/shm``, gone when the last descriptor and mapping
are) sealed against shrinking and handed to the server once with ``SCM_RIGHTS``. They
are reused by every call and layer and replaced by a bigger one (twice the size, or
what the call needs) when a call does not fit. Each exchange is a generator: it yields
``(datagram, descriptors)`` to send and receives the decoded answer, and returns the
call's value; so ``route`` is DESCRIBE (once per router) -> REGISTER (when a region
grows) -> ROUTE, whatever the I/O.

Hidden states on a CUDA device go by IPC handle when the server routes on CUDA (no
copy through the host); otherwise they are copied to the host region. Token ids
(``input_ids``, a hash router's) always go as host bytes, like the other small inputs:
the server copies them before it checks them, so they cannot change under the check.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import math
import mmap
import os
import secrets
import sys
from collections.abc import Generator, MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from moe_router_client import colocated_wire as wire
from moe_router_client.colocated_shared import SharedBuffers
from moe_router_client.errors import STATUS_ERRORS, InternalError, RouterError
from moe_router_client.results import RouteInfo, RouteResult
from moe_router_client.tensors import (
    WIRE_DTYPES,
    from_parts,
    numpy_dtype,
    to_parts,
    wire_dtype_of_torch,
)

__all__ = ["Step", "Session", "MemfdRegion", "error_from_message"]

Step = Generator[tuple[bytes | bytearray, list[int]], wire.Message, Any]
"""An exchange: yields (datagram, descriptors to send), is sent each decoded answer."""

MIN_REGION_BYTES = 64 * 1024
MAX_REMEMBERED_ROUTES = 1024
"""ROUTE datagrams a session keeps to send again (a model's layers x a few shapes);
encoding one anew cost 6 us of a 1-token call's 17 us of client work before the send."""
_PAGE = mmap.PAGESIZE
_sessions = itertools.count()


class MemfdRegion:
    """An anonymous shared-memory file (memfd) of ``size`` bytes, mapped here and sealed
    so that nobody can shrink it under the server's mapping."""

    def __init__(self, name: str, size: int) -> None:
        size = -(-size // _PAGE) * _PAGE
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            self.mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        self.name = name
        self.size = size
        self.bytes = np.frombuffer(self.mapping, dtype=np.uint8)

    def release_descriptor(self) -> None:
        """Close our descriptor once the server holds its own (the mapping stays)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.release_descriptor()
        del self.bytes
        self.mapping.close()


@dataclass(frozen=True)
class _OutputPlan:
    """How to read a layer's answers out of the output region: each output with the numpy
    dtype and element count to view it by (None: decoded by ``from_parts``), and the end of
    the last one."""

    outputs: tuple[tuple[wire.OutputRef, np.dtype | None, int], ...]
    end: int


@functools.lru_cache(maxsize=256)
def _output_plan(refs: tuple[wire.OutputRef, ...], region_size: int) -> _OutputPlan:
    """The plan of ``refs`` in a region of ``region_size`` bytes, its checks made once (a
    layer's answers lay out the same outputs call after call: ``colocated_wire`` keeps
    their refs; checking and decoding each anew cost 6 us of a 1-token call here)."""
    outputs = []
    end = 0
    for ref in refs:
        stop = ref.offset + ref.nbytes
        if ref.offset < 0 or stop > region_size:
            raise InternalError(grpc.StatusCode.INTERNAL,
                                f"output '{ref.name}' at bytes [{ref.offset}, {stop}) lies "
                                f"outside the {region_size}-byte output region")
        np_dtype = None
        if ref.dtype in WIRE_DTYPES and ref.nbytes and sys.byteorder == "little":
            np_dtype = numpy_dtype(ref.dtype)
            if math.prod(ref.shape) * np_dtype.itemsize != ref.nbytes:
                np_dtype = None  # from_parts names what is wrong
        outputs.append((ref, np_dtype, math.prod(ref.shape)))
        end = max(end, stop)
    return _OutputPlan(tuple(outputs), end)


def error_from_message(message: wire.Error) -> RouterError:
    """The typed client error of an ERROR answer (the classes RouterClient raises)."""
    code = getattr(grpc.StatusCode, message.code, grpc.StatusCode.UNKNOWN)
    metadata = {k: v for k, v in (("error", message.error),
                                  ("request_id", message.request_id)) if v}
    cls = STATUS_ERRORS.get(code, InternalError)
    return cls(code, message.message, reason=message.reason or None,
               retry_after_s=message.retry_after_s, metadata=metadata)


def _expect(answer: wire.Message, kind: type) -> Any:
    if isinstance(answer, wire.Error):
        raise error_from_message(answer)
    if not isinstance(answer, kind):
        raise InternalError(grpc.StatusCode.INTERNAL,
                            f"co-located server answered {type(answer).__name__}, "
                            f"expected {kind.__name__}")
    return answer


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch")


def _cuda_ref(tensor: Any) -> wire.CudaIpcRef:
    """The IPC fields of a CUDA tensor, as ``torch.multiprocessing`` shares it."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, args = reduce_tensor(tensor.detach())
    if rebuild is not rebuild_cuda_tensor:
        raise TypeError("only a strided CUDA tensor can be shared by its IPC handle")
    (_, _, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _,
     counter_handle, counter_offset, event_handle, event_sync) = args
    return wire.CudaIpcRef(
        int(device), bytes(handle), int(storage_bytes), int(storage_offset), int(offset),
        tuple(int(s) for s in stride), bytes(counter_handle or b""), int(counter_offset or 0),
        bytes(event_handle or b""), bool(event_sync),
    )


class Session:
    """The state of one connection: seq numbers, the server's WELCOME, two regions."""

    def __init__(
        self,
        api_key: str | None,
        descriptions: MutableMapping[str, wire.Description],
        *,
        inline_limit: int = 0,
    ) -> None:
        self.api_key = api_key or ""
        self.descriptions = descriptions  # shared by a client's sessions
        self.welcome: wire.Welcome | None = None
        self.inputs: MemfdRegion | None = None
        self.outputs: MemfdRegion | None = None
        self._inline_limit = inline_limit
        self._seq = itertools.count(1)
        self._prefix = f"colocated-{os.getpid()}-{next(_sessions)}-{secrets.token_hex(3)}"
        self._generation = itertools.count()
        self._routes: dict[tuple[Any, ...], bytes] = {}  # call's fields -> its ROUTE

    def next_seq(self) -> int:
        return next(self._seq)

    # ------------------------------------------------------------------ exchanges
    def hello(self) -> Step:
        """HELLO -> WELCOME (the key checked; the server's device and inline limit)."""
        answer = yield wire.encode(wire.Hello(self.next_seq(), self.api_key, os.getpid())), []
        self.welcome = _expect(answer, wire.Welcome)
        return self.welcome

    def _describe(self, router: str) -> Step:
        description = self.descriptions.get(router)
        if description is None:
            answer = yield wire.encode(wire.Describe(self.next_seq(), router)), []
            description = _expect(answer, wire.Description)
            self.descriptions[router] = description
        return description

    def register(self, region: MemfdRegion) -> Step:
        """REGISTER -> OK: hand ``region``'s descriptor to the server, which maps it (and
        drops it when this connection ends); the region is closed if that fails."""
        try:
            assert region.fd is not None
            answer = yield wire.encode(
                wire.Register(self.next_seq(), region.name, "", 0, region.size)
            ), [region.fd]
            _expect(answer, wire.Ok)
        except BaseException:
            region.close()
            raise
        region.release_descriptor()

    def _ensure(self, which: str, nbytes: int) -> Step:
        """The region ``which`` ("inputs" / "outputs"), replaced by a bigger one first
        when it holds fewer than ``nbytes`` bytes."""
        current: MemfdRegion | None = getattr(self, which)
        if current is not None and current.size >= nbytes:
            return current
        size = max(nbytes, MIN_REGION_BYTES, 2 * current.size if current else 0)
        region = MemfdRegion(f"{self._prefix}-{which}-{next(self._generation)}", size)
        yield from self.register(region)
        setattr(self, which, region)
        if current is not None:
            answer = yield wire.encode(wire.Unregister(self.next_seq(), current.name)), []
            current.close()
            _expect(answer, wire.Ok)
        return region

    def route(
        self,
        router: str,
        hidden_states: Any,
        layer: int,
        *,
        extra_inputs: dict[str, Any],
        input_ids: Any,
        return_router_logits: bool,
        return_losses: bool,
        skip_cache: bool,
        seed: int | None,
        request_id: str | None,
        timeout_s: Any,
        as_torch: bool,
        shared: SharedBuffers | None = None,
    ) -> Step:
        """DESCRIBE (first time) -> REGISTER (when a region grows) -> ROUTE -> result.

        ``timeout_s``: a callable giving the seconds left (None: no deadline), read just
        before ROUTE goes so the server's deadline is the caller's. ``shared``: the
        client's shared buffers; an input inside one goes by reference, not copied.
        """
        description = yield from self._describe(router)
        assert self.welcome is not None
        budget = min(self._inline_limit, self.welcome.inline_limit)
        placed: list[tuple[str, int, tuple[int, ...], Any]] = []  # name, dtype, shape, data
        cuda_refs: dict[str, wire.CudaIpcRef] = {}
        shared_refs: dict[str, wire.RegionRef] = {}
        inputs_named = [("hidden_states", hidden_states), *extra_inputs.items()]
        if input_ids is not None:
            inputs_named.append(("input_ids", input_ids))
        for name, value in inputs_named:
            if (name != "input_ids" and _is_torch(value) and value.device.type == "cuda"
                    and self.welcome.device.startswith("cuda")):
                cuda_refs[name] = _cuda_ref(value)
                placed.append((name, wire_dtype_of_torch(value.dtype), tuple(value.shape), None))
                continue
            dtype, shape, storage = to_parts(value)
            in_place = shared.find(storage) if shared is not None else None
            if in_place is not None:  # read by the server where it lies
                shared_refs[name] = in_place
                placed.append((name, dtype, shape, None))
                continue
            placed.append((name, dtype, shape, storage))
        host_bytes = sum(wire.aligned(p[3].nbytes) for p in placed if p[3] is not None)
        inline = host_bytes <= budget
        if not inline and host_bytes:
            inputs = yield from self._ensure("inputs", host_bytes)
        first = placed[0][2]
        tokens = math.prod(first[:-1]) if first else 0
        need = wire.output_bytes_bound(tokens, description, return_router_logits)
        outputs = yield from self._ensure("outputs", need)
        # A call like an earlier one (a layer's next step) reuses its datagram: the same
        # fields make the same bytes, but for seq and the timeout. Not one whose datagram
        # carries its tensors, an IPC handle (good for one call) or its own request id.
        key = None if (inline and host_bytes) or cuda_refs or request_id else (
            router, layer, return_router_logits, return_losses, skip_cache, seed,
            outputs.name, outputs.size, inputs.name if host_bytes else "",
            *((name, dtype, shape, shared_refs.get(name)) for name, dtype, shape, _ in placed),
        )
        datagram = self._routes.get(key) if key is not None else None
        refs = []
        at = 0
        for name, dtype, shape, storage in placed:
            if storage is None:
                if datagram is None:
                    place = shared_refs.get(name) or cuda_refs[name]
                    refs.append(wire.TensorRef(name, dtype, shape, place))
            elif inline:
                refs.append(wire.TensorRef(name, dtype, shape, None,
                                           memoryview(storage.reshape(-1).view(np.uint8))))
            else:
                flat = storage.reshape(-1).view(np.uint8)
                inputs.bytes[at : at + flat.nbytes] = flat
                if datagram is None:
                    refs.append(wire.TensorRef(name, dtype, shape,
                                               wire.RegionRef(inputs.name, at, flat.nbytes)))
                at = wire.aligned(at + flat.nbytes)
        if datagram is None:
            datagram = wire.encode(wire.Route(
                0, router, layer, wire.RegionRef(outputs.name, 0, outputs.size),
                tuple(refs), request_id or "", return_router_logits, skip_cache, seed,
                None, return_losses=return_losses,
            ))
            if key is not None:
                if len(self._routes) >= MAX_REMEMBERED_ROUTES:
                    self._routes.clear()
                self._routes[key] = datagram
        answer = yield wire.restamp_route(datagram, self.next_seq(), timeout_s()), []
        return self._result(_expect(answer, wire.Routed), outputs, as_torch)

    @staticmethod
    def _result(routed: wire.Routed, outputs: MemfdRegion, as_torch: bool) -> RouteResult:
        """The RouteResult of a ROUTED answer; the outputs copied out of the output region
        at once (it is reused by the next call), each checked to lie inside it."""
        plan = _output_plan(routed.outputs, outputs.size)
        data = outputs.mapping[: plan.end]
        arrays: dict[str, Any] = {}
        for ref, np_dtype, count in plan.outputs:
            if np_dtype is not None and not as_torch:  # a view of the copy, as from_parts'
                arrays[ref.name] = np.frombuffer(data, np_dtype, count, ref.offset).reshape(
                    ref.shape)
            else:
                arrays[ref.name] = from_parts(
                    ref.dtype, ref.shape, data[ref.offset : ref.offset + ref.nbytes], as_torch)
        return RouteResult(
            expert_indices=arrays["expert_indices"],
            expert_weights=arrays["expert_weights"],
            num_experts_per_token=arrays["num_experts_per_token"],
            complexity_scores=arrays.get("complexity_scores"),
            router_logits=arrays.get("router_logits"),
            dispatch_weights=arrays.get("dispatch_weights"),
            combine_weights=arrays.get("combine_weights"),
            expert_tokens=arrays.get("expert_tokens"),
            expert_token_weights=arrays.get("expert_token_weights"),
            info=RouteInfo(
                aux_loss=routed.aux_loss,
                z_loss=routed.z_loss,
                tokens_per_expert=list(routed.tokens_per_expert),
                dropped_tokens=routed.dropped_tokens,
                router_version=routed.router_version,
                cache_hit=routed.cache_hit,
                batch_requests=routed.batch_requests,
                batch_tokens=routed.batch_tokens,
                queue_time_us=routed.queue_time_us,
                compute_time_us=routed.compute_time_us,
                request_id=routed.request_id,
                layer=routed.layer,
            ),
        )

    def close(self) -> None:
        """Unmap both regions (the server drops its side when the connection closes)."""
        for which in ("inputs", "outputs"):
            region = getattr(self, which)
            if region is not None:
                region.close()
                setattr(self, which, None)
