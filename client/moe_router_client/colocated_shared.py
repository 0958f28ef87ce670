"""Shared input buffers of a co-located client: arrays that live in shared memory the server
has mapped, so a call that passes one is routed where it lies, with no copy.

    buffer = client.shared_buffer((tokens, 4096), torch.bfloat16)   # once
    buffer.copy_(hidden_states)            # or let the model write its output there
    client.route("mixtral", buffer, layer=3)   # the server reads it in place

A client's ordinary inputs are copied into its connection's input region on every call
(32 MiB for 2048 x 4096 fp32: 1.3 ms here). A shared buffer is a memfd region of its own,
registered once through a connection the client keeps for that alone (a route that
times out never takes its registrations with it), and found by address: an input whose
bytes lie inside one goes as a reference to them. A slice or view of a buffer works as
well, as long as it is contiguous; anything else is copied as usual.

The server reads the bytes during the call: do not write a buffer while a call that
passes it runs. Buffers live until the client closes (the server drops its side at
once; the memory goes when the last array over it does).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from typing import Any

import numpy as np

from moe_router_client import colocated_wire as wire

__all__ = ["SharedBuffers", "nbytes_of", "plain_array", "shared_array"]

_buffers = itertools.count()


def _is_torch_dtype(dtype: Any) -> bool:
    return type(dtype).__module__.startswith("torch")  # no torch import for numpy callers


def shared_array(mapping: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """An array of ``shape`` and ``dtype`` over ``mapping``'s first bytes: a torch tensor
    for a torch dtype (bfloat16 included), else a numpy array."""
    count = math.prod(shape)
    if _is_torch_dtype(dtype):
        import torch

        return torch.frombuffer(mapping, dtype=dtype, count=count).view(shape)
    return np.frombuffer(mapping, dtype=np.dtype(dtype), count=count).reshape(shape)


def plain_array(shape: tuple[int, ...], dtype: Any) -> Any:
    """An ordinary empty array of ``shape`` and ``dtype`` (the gRPC fallback's buffer)."""
    if _is_torch_dtype(dtype):
        import torch

        return torch.empty(shape, dtype=dtype)
    return np.empty(shape, dtype=np.dtype(dtype))


def nbytes_of(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes an array of ``shape`` and ``dtype`` (torch or numpy) takes."""
    itemsize = dtype.itemsize if _is_torch_dtype(dtype) else np.dtype(dtype).itemsize
    return math.prod(shape) * itemsize


class SharedBuffers:
    """A client's shared buffers: their regions, and where an input lies among them."""

    def __init__(self) -> None:
        self._prefix = f"shared-{os.getpid()}-{secrets.token_hex(4)}"
        self._regions: list[tuple[int, Any]] = []  # (base address, MemfdRegion)

    def new_name(self) -> str:
        """A region name no other buffer of any process of this user takes."""
        return f"{self._prefix}-{next(_buffers)}"

    def add(self, region: Any) -> None:
        """Keep ``region`` (a registered MemfdRegion) as a buffer."""
        self._regions.append((region.bytes.__array_interface__["data"][0], region))

    def find(self, storage: np.ndarray) -> wire.RegionRef | None:
        """The reference to ``storage``'s bytes when they lie inside a buffer (C-contiguous,
        as the codec hands them), else None."""
        if not self._regions or not storage.flags.c_contiguous:
            return None
        address, nbytes = storage.__array_interface__["data"][0], storage.nbytes
        for base, region in self._regions:
            if base <= address and address + nbytes <= base + region.size:
                return wire.RegionRef(region.name, address - base, nbytes)
        return None

    def close(self) -> None:
        """Unmap every buffer no array still uses (the others go with their last array)."""
        regions, self._regions = self._regions, []
        for _, region in regions:
            try:
                region.close()
            except BufferError:  # an array over it lives on: the mapping goes with it
                pass
