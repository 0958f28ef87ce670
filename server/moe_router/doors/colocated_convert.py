"""Co-located door messages <-> domain: a ROUTE message becomes the same
:class:`RouteCall` a gRPC Route makes, a :class:`RouteResult` is written into the caller's
output region and answered as ROUTED, an error becomes an ERROR with the status code,
message, reason and retry delay the gRPC door would send.

Tensors stay where they are: a view of the caller's registered region (no copy), the
bytes of the datagram (inline), or the caller's CUDA memory opened by its IPC handle
(:mod:`moe_router.doors.cuda_ipc`). Every reference is checked by the region registry
before a view exists (registered by this owner, inside the region, file not shrunk), so
a bad one is INVALID_ARGUMENT and nothing outside a region is ever read or written.
Token ids (``input_ids``) are the exception: copied out of the caller's bytes, since
they index the hash table and the caller could rewrite its region between the device
stage's range check and the lookup.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
from google.rpc import error_details_pb2

from moe_router.chain.backend import AT_ONCE, AfterAnswer, RouteCall, RouteOptions, RouteResult
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.cuda_ipc import open_cuda_tensor
from moe_router.doors.rpc_errors import new_request_id
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.doors.v1_convert import ACCEPTED_DTYPES
from moe_router.errors import NotFoundError, ValidationError
from moe_router.routing.kinds import RoutingMethod
from moe_router.status_mapping import status_entry_for, to_status
from moe_router_client import colocated_wire as wire
from moe_router_client.tensors import (
    TensorCodecError,
    dtype_name,
    from_parts,
    itemsize,
    to_parts,
)
from moe_router_client.v1 import router_pb2 as pb

__all__ = ["RegionViews", "route_to_call", "result_to_routed", "error_to_message", "describe"]

_OPTIONAL_OUTPUTS = wire.OUTPUT_NAMES[3:]
_HOST_DTYPES = {torch.int32: pb.INT32, torch.float32: pb.FLOAT32}
_ESTIMATOR_INPUTS = frozenset(wire.INPUT_NAMES) - {"hidden_states", "input_ids"}


class RegionViews:
    """The views one caller's ROUTEs take of its regions, each checked by the registry
    (registered by this owner, inside the region, file not shrunk) and kept while it
    lasts: a sealed memfd's (it cannot shrink) until a region is registered or
    unregistered anywhere (the registry's generation). A layer's next call names the
    same references; taking the three views and the input's torch view anew cost 9 us of
    a 1-token call's 97 us in the door, measured in a loop. A file by key is checked on
    every call. Views of an unregistered region are let go at the caller's next call or
    when it disconnects (its mapping lives until then)."""

    MAX_KEPT = 64

    def __init__(self, regions: SharedMemoryRegistry, owner: str) -> None:
        self.regions = regions
        self.owner = owner
        self._generation = -1
        self._bytes: dict[tuple[str, int, int], memoryview] = {}
        self._tensors: dict[tuple[wire.RegionRef, int, tuple[int, ...]], torch.Tensor] = {}

    def _kept(self) -> bool:
        """Whether what is kept is still good (else it is let go now)."""
        generation = self.regions.generation
        if generation == self._generation:
            return True
        self.clear()
        self._generation = generation
        return False

    def view(self, name: str, offset: int, byte_size: int) -> memoryview:
        """Bytes [offset, offset + byte_size) of region ``name``."""
        key = (name, offset, byte_size)
        view = self._bytes.get(key) if self._kept() else None
        if view is None:
            view, lasting = self.regions.checked_view(name, offset, byte_size, owner=self.owner)
            if lasting:
                if len(self._bytes) >= self.MAX_KEPT:
                    self._bytes.clear()
                self._bytes[key] = view
        return view

    def tensor(self, ref: wire.TensorRef, place: wire.RegionRef) -> torch.Tensor:
        """The input ``ref`` as a torch view of the bytes ``place`` names."""
        key = (place, ref.dtype, ref.shape)
        tensor = self._tensors.get(key) if self._kept() else None
        if tensor is None:
            data, lasting = self.regions.checked_view(
                place.name, place.offset, place.byte_size, owner=self.owner)
            tensor = _from_bytes(ref, data)
            if lasting:
                if len(self._tensors) >= self.MAX_KEPT:
                    self._tensors.clear()
                self._tensors[key] = tensor
        return tensor

    def clear(self) -> None:
        """Let every kept view go."""
        self._bytes.clear()
        self._tensors.clear()


def _from_bytes(ref: wire.TensorRef, data: bytes | memoryview) -> torch.Tensor:
    try:
        return from_parts(ref.dtype, ref.shape, data, as_torch=True)  # type: ignore[no-any-return]
    except TensorCodecError as exc:
        raise ValidationError(f"{ref.name}: {exc}") from exc


def _tensor(ref: wire.TensorRef, views: RegionViews, device: torch.device) -> torch.Tensor:
    """The input ``ref`` names, as a view where it lies (estimator inputs must be
    floats, as Route's; checked before anything is opened)."""
    if ref.name in _ESTIMATOR_INPUTS and ref.dtype not in ACCEPTED_DTYPES:
        raise ValidationError(
            f"{ref.name}: dtype {dtype_name(ref.dtype)} is not accepted; expected FLOAT32, "
            "FLOAT16 or BFLOAT16"
        )
    place = ref.place
    if isinstance(place, wire.CudaIpcRef):
        if ref.name == "input_ids":
            raise ValidationError(
                "input_ids: send them as host bytes (inline or in a region), not by CUDA IPC "
                "handle; the client does so for a CUDA tensor"
            )
        return open_cuda_tensor(place, ref.dtype, ref.shape, device=device, name=ref.name)
    if place is None:
        return _from_bytes(ref, ref.data)
    return views.tensor(ref, place)


def route_to_call(
    message: wire.Route,
    chains: Mapping[str, HostedRouterChain],
    views: RegionViews,
    *,
    peer: str,
    device: torch.device,
    after_answer: AfterAnswer = AT_ONCE,
) -> RouteCall:
    """Decode a ROUTE into a RouteCall (what ``v1_convert.request_to_call`` does for
    Route); the output reference is checked now, so a bad one costs no routing.
    ``after_answer``: the call's records the door runs once it has sent the answer."""
    if not message.router:
        raise ValidationError(f"router: required; this server hosts {sorted(chains)}")
    if message.router not in chains:
        raise NotFoundError(
            f"unknown router '{message.router[:100]}'; this server hosts {sorted(chains)}"
        )
    out = message.output
    views.view(out.name, out.offset, out.byte_size)  # a bad reference fails now
    tensors: dict[str, torch.Tensor] = {}
    for ref in message.tensors:
        if ref.name in tensors:
            raise ValidationError(f"input '{ref.name}' appears more than once")
        tensors[ref.name] = _tensor(ref, views, device)
    hidden = tensors.pop("hidden_states", None)
    if hidden is None:
        raise ValidationError(
            "hidden_states: required, a [tokens, dim] or [batch, seq, dim] tensor"
        )
    input_ids = tensors.pop("input_ids", None)
    if input_ids is not None:  # dtype, shape and range: DeviceExecutor.admit, as for Route
        input_ids = input_ids.clone()
    timeout = message.timeout_s
    return RouteCall(
        router=message.router,
        layer=message.layer,
        hidden_states=hidden,
        options=RouteOptions(
            return_router_logits=message.return_router_logits,
            return_losses=message.return_losses,
            skip_cache=message.skip_cache,
            seed=message.seed,
            extra_inputs=tensors,
            input_ids=input_ids,
        ),
        deadline=None if timeout is None else time.monotonic() + timeout,
        request_id=message.request_id or new_request_id(),
        peer=peer,
        after_answer=after_answer,
    )


def _outputs(result: RouteResult, call: RouteCall) -> list[tuple[str, int, np.ndarray]]:
    """(name, wire dtype, contiguous array) of every output, as Route encodes them (the
    outputs are host int32 / float32 tensors: their numpy views, no codec detour)."""
    out = result.output
    arrays = []
    for name in wire.OUTPUT_NAMES:
        tensor = getattr(out, name)
        if tensor is None or (name == "router_logits" and not call.options.return_router_logits):
            continue
        if name == "expert_tokens":
            tensor = tensor.to(torch.int32)  # as Route sends it
        elif name in _OPTIONAL_OUTPUTS:
            tensor = tensor.float()  # as Route sends them
        host = _HOST_DTYPES.get(tensor.dtype) if tensor.is_cpu else None
        if host is None or tensor.requires_grad:  # the codec's general path
            wire_dtype, _, array = to_parts(tensor)
        else:
            wire_dtype, array = host, np.ascontiguousarray(tensor.numpy())
        arrays.append((name, int(wire_dtype), array))
    return arrays


@functools.lru_cache(maxsize=256)
def _layout(
    outputs: tuple[tuple[str, int, tuple[int, ...]], ...],
) -> tuple[tuple[wire.OutputRef, ...], int]:
    """Where each output (name, wire dtype, shape) lies in the output region, and the
    bytes they need (kept: a layer's answers have the same shapes call after call)."""
    refs = []
    at = 0
    for name, dtype, shape in outputs:
        nbytes = math.prod(shape) * itemsize(dtype)
        refs.append(wire.OutputRef(name, dtype, shape, at, nbytes))
        at = wire.aligned(at + nbytes)
    return tuple(refs), refs[-1].offset + refs[-1].nbytes


def result_to_routed(
    result: RouteResult,
    call: RouteCall,
    message: wire.Route,
    views: RegionViews,
) -> wire.Routed:
    """Write the outputs into the request's output region (layout: ``colocated_wire``)
    and describe them, with RoutingInfo's scalars, in the ROUTED answer."""
    arrays = _outputs(result, call)
    refs, needed = _layout(tuple((name, dtype, array.shape) for name, dtype, array in arrays))
    target = message.output
    if needed > target.byte_size:
        raise ValidationError(
            f"output region '{target.name}': the reference gives {target.byte_size} bytes, "
            f"this answer needs {needed} ({', '.join(r.name for r in refs)})"
        )
    view = views.view(target.name, target.offset, target.byte_size)
    for ref, (_, _, array) in zip(refs, arrays, strict=True):
        if not ref.nbytes:  # (an empty array's buffer cannot be cast to bytes)
            continue
        # numpy's own dtypes cast to bytes as they are (twice as fast as a uint8 view);
        # bfloat16 (ml_dtypes) cannot be exported through a buffer that way
        data = array.data.cast("B") if array.dtype.isbuiltin else array.reshape(-1).view(
            np.uint8).data
        view[ref.offset : ref.offset + ref.nbytes] = data
    out = result.output
    return wire.Routed(
        seq=message.seq,
        outputs=refs,
        tokens_per_expert=tuple(out.tokens_per_expert.tolist()),
        dropped_tokens=int(out.dropped_tokens),
        router_version=result.router_version,
        cache_hit=result.cache_hit,
        batch_requests=result.batch_requests,
        batch_tokens=result.batch_tokens,
        queue_time_us=result.queue_time_us,
        compute_time_us=result.compute_time_us,
        request_id=call.request_id,
        layer=call.layer,
        aux_loss=None if out.aux_loss is None else float(out.aux_loss),
        z_loss=None if out.z_loss is None else float(out.z_loss),
    )


def error_to_message(exc: BaseException, seq: int, request_id: str = "") -> wire.Error:
    """The ERROR answer of ``exc``: what ``to_status`` gives the gRPC door (code, the
    bounded message, ErrorInfo reason and metadata, RetryInfo delay)."""
    status = to_status(exc, request_id)
    entry = status_entry_for(exc)
    retry_after_s = None
    error_class = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            error_class = info.metadata.get("error", "")
    return wire.Error(
        seq=seq,
        code=entry.code.name,
        message=status.message[: wire.MAX_ERROR_CHARS],
        reason=entry.reason,
        retry_after_s=retry_after_s,
        error=error_class,
        request_id=request_id,
    )


def describe(chain: HostedRouterChain, seq: int) -> wire.Description:
    """What a client needs to size its output region for ``chain``'s router."""
    hosted = chain.hosted
    first = hosted.layers[0]
    experts = first.num_experts
    extra = 1  # complexity_scores (dynamic routers): budgeted for every router, 4 B a token
    if hosted.spec.kind is RoutingMethod.SOFT_MOE:
        extra += 2 * experts * hosted.spec.slots_per_expert  # dispatch and combine weights
    config = first.config
    if config.pad_to_capacity:  # expert_tokens + expert_token_weights [E, G * C]
        if config.expert_capacity is not None:  # C fixed; at most one group per token
            extra += 2 * experts * config.expert_capacity
        else:  # E * ceil(T_g * k * f / E) <= T_g * k * f + E for each group g <= T
            extra += 2 * (math.ceil(first.k_range[1] * (config.capacity_factor or 1.0)) + experts)
    return wire.Description(
        seq=seq,
        router=chain.name,
        layers=len(hosted.layers),
        input_dim=first.hidden_size,
        num_experts=experts,
        k_max=first.k_range[1],
        extra_columns=extra,
    )
