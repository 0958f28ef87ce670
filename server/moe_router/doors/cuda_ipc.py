"""Open a caller's CUDA tensor by its IPC handle, for the co-located door: hidden states
already on the GPU are routed where they lie, with no copy through the host.

The caller shares a CUDA tensor as ``torch.multiprocessing`` does
(``reductions.reduce_tensor``: the allocation's ``cudaIpcMemHandle``, the storage's
offset and size in it, the producer's reference counter and the event its writes are
ordered by). The fields travel as plain values (``colocated_wire.CudaIpcRef``) and are
rebuilt here with ``reductions.rebuild_cuda_tensor``, never unpickled. Opening a handle
costs a ``cudaIpcOpenMemHandle`` the first time; torch keeps the mapping in its cache
for the storage's lifetime, so a caller that reuses its buffers pays it once.

Checked before anything is opened (each a ValidationError, INVALID_ARGUMENT): the
server routes on CUDA, the handle's device is the router's, the dtype is a wire float
dtype, strides are non-negative, and the tensor's last element lies inside the shared
storage (``(offset + sum((size - 1) * stride) + 1) * itemsize <= storage bytes``), so the
view never reaches past the memory the caller shared.
"""

from __future__ import annotations

import math

import torch

from moe_router.errors import ValidationError
from moe_router_client import colocated_wire as wire
from moe_router_client.tensors import TensorCodecError, itemsize, torch_dtype
from moe_router_client.v1 import router_pb2 as pb

__all__ = ["open_cuda_tensor", "tensor_extent_bytes"]

_FLOATS = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)


def tensor_extent_bytes(
    shape: tuple[int, ...], stride: tuple[int, ...], offset: int, element_bytes: int
) -> int:
    """Bytes from the storage's start through the tensor's last element (0 if empty)."""
    if math.prod(shape) == 0:
        return 0
    last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
    return (last + 1) * element_bytes


def _check(ref: wire.CudaIpcRef, dtype: int, shape: tuple[int, ...], device: torch.device,
           name: str) -> torch.dtype:
    if device.type != "cuda":
        raise ValidationError(
            f"{name}: sent as a CUDA IPC handle, but this server routes on {device}; "
            "send it in a host shared-memory region"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if ref.device != index:
        raise ValidationError(
            f"{name}: the CUDA IPC handle is of device {ref.device}, the router runs on "
            f"cuda:{index}; move the tensor there or send it in a host region"
        )
    if dtype not in _FLOATS:
        raise ValidationError(f"{name}: dtype {dtype} over CUDA IPC; expected FLOAT32, "
                              "FLOAT16 or BFLOAT16")
    if len(ref.stride) != len(shape) or any(step < 0 for step in ref.stride):
        raise ValidationError(
            f"{name}: strides {list(ref.stride)} for shape {list(shape)}; expected one "
            "non-negative stride per dimension"
        )
    if ref.tensor_offset < 0 or not ref.handle:
        raise ValidationError(f"{name}: a CUDA IPC reference needs a handle and an offset >= 0")
    try:
        element_bytes = itemsize(dtype)
        t_dtype = torch_dtype(dtype)
    except TensorCodecError as exc:
        raise ValidationError(f"{name}: {exc}") from exc
    extent = tensor_extent_bytes(shape, ref.stride, ref.tensor_offset, element_bytes)
    if extent > ref.storage_size_bytes:
        raise ValidationError(
            f"{name}: shape {list(shape)} with strides {list(ref.stride)} at offset "
            f"{ref.tensor_offset} reaches byte {extent} of a {ref.storage_size_bytes}-byte "
            "shared storage"
        )
    return t_dtype


def open_cuda_tensor(
    ref: wire.CudaIpcRef, dtype: int, shape: tuple[int, ...], *, device: torch.device,
    name: str = "hidden_states",
) -> torch.Tensor:
    """The caller's CUDA tensor, opened in place (a view of its memory, no copy)."""
    t_dtype = _check(ref, dtype, shape, device, name)
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(shape), tuple(ref.stride), ref.tensor_offset,
            torch.storage.TypedStorage, t_dtype, ref.device, ref.handle,
            ref.storage_size_bytes, ref.storage_offset_bytes, False,
            ref.ref_counter_handle or None, ref.ref_counter_offset, ref.event_handle or None,
            ref.event_sync_required,
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValidationError(
            f"{name}: the CUDA IPC handle could not be opened ({str(exc)[:200]}); share a "
            "live CUDA tensor of the server's device from another process"
        ) from exc
