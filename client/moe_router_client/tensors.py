"""The wire codec: numpy arrays and torch tensors <-> ``moe_router.v1.Tensor``, shared by
client and server.

A wire Tensor is a dtype tag, a shape and the row-major **little-endian** bytes of the
elements, never repeated floats. bfloat16 travels as its 2-byte pattern (the upper half
of a float32).

Copies, per direction (protobuf's own copies included, so the costs add up honestly):

- ``to_wire``: one ``tobytes()`` (which also makes a non-contiguous input contiguous;
  torch tensors are viewed as numpy arrays, not copied, unless they live off the CPU),
  then one copy when protobuf stores the bytes in the message. Pass ``out=`` (for example
  ``request.hidden_states``) to fill a message field in place instead of building a
  Tensor and copying it into the parent (which would be one more copy).
- ``from_wire``: reading ``tensor.data`` copies the bytes out of the parsed message once
  (upb makes a new ``bytes`` object on every access; the codec reads it once); the array
  or tensor is then a zero-copy view of those bytes (``numpy.frombuffer`` /
  ``torch.frombuffer``). With ``writable=True`` there is one more copy, into a
  ``bytearray`` the result owns.

The views returned by default are over an immutable ``bytes`` object: numpy arrays come
back **read-only** (``arr.flags.writeable`` is False; ``arr.copy()`` to modify), and
torch tensors, which have no read-only flag, must be treated the same way (clone before
an in-place op) or requested with ``writable=True``. Big-endian hosts byte-swap (one
extra copy each way).

Torch is optional and never imported by this module's import: only when a torch tensor
is given or ``as_torch=True`` is asked for.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from moe_router_client.v1 import router_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "DType",
    "TensorCodecError",
    "WIRE_DTYPES",
    "dtype_name",
    "itemsize",
    "numpy_dtype",
    "torch_dtype",
    "wire_dtype_of_numpy",
    "wire_dtype_of_torch",
    "to_wire",
    "to_parts",
    "from_wire",
    "from_parts",
]

# The wire dtype enum, for ``to_wire(bits, dtype=DType.BFLOAT16)``. Its values are plain
# ints (pb.FLOAT32 == DType.FLOAT32 == 1), which is what the functions take and return.
DType = pb.DType

# Every dtype the wire carries, with its element size in bytes.
WIRE_DTYPES: dict[int, int] = {
    pb.FLOAT32: 4,
    pb.FLOAT16: 2,
    pb.BFLOAT16: 2,
    pb.INT32: 4,
    pb.INT64: 8,
}
# Little-endian numpy storage dtype per wire dtype (bf16 stored as its uint16 pattern).
_LE_NUMPY: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
}
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_BFLOAT16 = pb.BFLOAT16
_TORCH_READONLY_WARNING = "The given buffer is not writable"
_readonly_warning_spent = False  # torch has given its one read-only buffer warning


class TensorCodecError(ValueError):
    """A Tensor cannot be encoded or decoded: unknown dtype, bad shape, wrong byte count."""


def dtype_name(dtype: int) -> str:
    """The enum name of a wire dtype (``FLOAT32``), or ``<n>`` for a number the enum lacks."""
    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return str(dtype)


def _supported() -> str:
    return ", ".join(pb.DType.Name(d) for d in WIRE_DTYPES)


def _check_dtype(dtype: int, field: str = "Tensor.dtype") -> None:
    if dtype not in WIRE_DTYPES:
        raise TensorCodecError(f"{field}: {dtype_name(dtype)} is not a wire dtype; expected one "
                               f"of {_supported()}")


def itemsize(dtype: int) -> int:
    """Bytes per element of a wire dtype."""
    _check_dtype(dtype)
    return WIRE_DTYPES[dtype]


@cache
def _ml_dtypes_bfloat16() -> np.dtype | None:
    """``ml_dtypes.bfloat16`` when ml_dtypes is installed, else None."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype ``from_wire`` returns for a wire dtype (native byte order).

    BFLOAT16 is ``ml_dtypes.bfloat16`` when ml_dtypes is installed, else ``uint16`` (the
    raw bit pattern).
    """
    _check_dtype(dtype)
    if dtype == pb.BFLOAT16:
        return _ml_dtypes_bfloat16() or np.dtype(np.uint16)
    return _LE_NUMPY[dtype].newbyteorder("=")


def wire_dtype_of_numpy(np_dtype: np.dtype | type) -> int:
    """The wire dtype of a numpy dtype (any byte order); uint16 is not bf16 unless said so."""
    np_dtype = np.dtype(np_dtype)
    if np_dtype == _ml_dtypes_bfloat16():
        return pb.BFLOAT16
    for wire, stored in _LE_NUMPY.items():
        same_kind = np_dtype.kind == stored.kind and np_dtype.itemsize == stored.itemsize
        if same_kind and wire != pb.BFLOAT16:
            return wire
    raise TensorCodecError(
        f"dtype {np_dtype} has no wire dtype; send float32, float16, bfloat16 (ml_dtypes, or a "
        f"uint16 view with dtype=BFLOAT16), int32 or int64, e.g. array.astype(numpy.float32)"
    )


def torch_dtype(dtype: int) -> torch.dtype:
    """The torch dtype of a wire dtype (imports torch)."""
    import torch

    _check_dtype(dtype)
    table: dict[int, torch.dtype] = {
        pb.FLOAT32: torch.float32,
        pb.FLOAT16: torch.float16,
        pb.BFLOAT16: torch.bfloat16,
        pb.INT32: torch.int32,
        pb.INT64: torch.int64,
    }
    return table[dtype]


_TORCH_WIRE_DTYPES: dict[Any, int] = {}  # filled on first use: torch is imported lazily


def wire_dtype_of_torch(t_dtype: torch.dtype) -> int:
    """The wire dtype of a torch dtype."""
    table = _TORCH_WIRE_DTYPES
    if not table:
        import torch

        table.update({
            torch.float32: pb.FLOAT32,
            torch.float16: pb.FLOAT16,
            torch.bfloat16: pb.BFLOAT16,
            torch.int32: pb.INT32,
            torch.int64: pb.INT64,
        })
    if t_dtype not in table:
        raise TensorCodecError(
            f"dtype {t_dtype} has no wire dtype; send float32, float16, bfloat16, int32 or "
            f"int64, e.g. tensor.float()"
        )
    return table[t_dtype]


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch")


def _torch_storage_view(tensor: torch.Tensor) -> tuple[int, np.ndarray]:
    """A CPU numpy view (no copy for CPU tensors) of a torch tensor's elements, bf16 as int16."""
    import torch

    if tensor.layout != torch.strided:
        raise TensorCodecError(f"layout {tensor.layout} cannot be sent; use tensor.to_dense()")
    wire = wire_dtype_of_torch(tensor.dtype)
    # Each only when needed: detach() and device.type cost 0.3 us each, the checks 0.05.
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: same-size view of the bit pattern
        tensor = tensor.view(torch.int16)
    if tensor.is_neg():  # a lazily negated view (conjugation: no complex dtype is sent)
        tensor = tensor.resolve_neg()
    return wire, tensor.numpy()


def _numpy_storage_view(array: np.ndarray, dtype: int | None) -> tuple[int, np.ndarray]:
    natural = None if array.dtype == np.uint16 else wire_dtype_of_numpy(array.dtype)
    if natural is None:  # uint16: only as the bit pattern of bf16, and only when said so
        if dtype != pb.BFLOAT16:
            raise TensorCodecError(
                "dtype uint16 has no wire dtype; pass dtype=DType.BFLOAT16 if the array holds "
                "bfloat16 bit patterns"
            )
        return pb.BFLOAT16, array
    if natural == pb.BFLOAT16:
        array = array.view(np.uint16)  # ml_dtypes bf16 -> its bit pattern, same bytes
    return natural, array


def to_parts(array: Any, dtype: int | None = None) -> tuple[int, tuple[int, ...], np.ndarray]:
    """(wire dtype, shape, C-contiguous little-endian numpy view) of ``array``, no copy
    unless the array is non-contiguous, big-endian or on a device. Arguments as
    :func:`to_wire`."""
    if dtype is not None:
        _check_dtype(dtype, "dtype")
    if _is_torch(array):
        wire, storage = _torch_storage_view(array)
    elif isinstance(array, np.ndarray):
        wire, storage = _numpy_storage_view(array, dtype)
    else:
        raise TypeError(
            f"to_wire takes a numpy.ndarray or torch.Tensor, not {type(array).__name__}"
        )
    if dtype is not None and dtype != wire:
        raise TensorCodecError(
            f"dtype={dtype_name(dtype)} does not match the array's {dtype_name(wire)}; "
            f"convert the array instead"
        )
    order = storage.dtype.byteorder
    if order == ">" or (order == "=" and _BIG_ENDIAN_HOST):
        storage = storage.byteswap()  # the wire is little-endian
    return wire, tuple(storage.shape), np.ascontiguousarray(storage)


def to_wire(array: Any, dtype: int | None = None, *, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a numpy array or torch tensor as a wire Tensor (one ``tobytes()``).

    ``array``: numpy (float32, float16, int32, int64, ``ml_dtypes.bfloat16``, or uint16 bf16
    bit patterns with ``dtype=pb.BFLOAT16``) or torch (those dtypes and bfloat16; moved to
    the CPU when needed; non-contiguous is fine). ``dtype`` states the wire dtype, which
    must agree with the array's. ``out`` is a Tensor field to fill in place (returned).
    """
    wire, shape, storage = to_parts(array, dtype)
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = cast("pb.DType", wire)
    del tensor.shape[:]
    tensor.shape.extend(shape)
    tensor.data = storage.tobytes()
    return tensor


def _validated_shape(dtype: int, dims: Sequence[int], nbytes: int) -> tuple[int, ...]:
    """The shape after checking dtype, dimensions and byte count."""
    _check_dtype(dtype)
    shape = tuple(map(int, dims))
    if shape and min(shape) < 0:
        axis = next(i for i, dim in enumerate(shape) if dim < 0)
        raise TensorCodecError(
            f"Tensor.shape: dimension {axis} is {shape[axis]} in {list(shape)}; dimensions "
            "must be >= 0"
        )
    size = WIRE_DTYPES[dtype]
    expected = math.prod(shape) * size
    if nbytes != expected:
        raise TensorCodecError(
            f"Tensor.data: holds {nbytes} bytes, expected {expected} "
            f"(shape {list(shape)} x {size} bytes of {dtype_name(dtype)})"
        )
    return shape


def from_wire(tensor: pb.Tensor, as_torch: bool = False, *, writable: bool = False) -> Any:
    """Decode a wire Tensor into a numpy array (default) or a CPU torch tensor.

    numpy: read-only view of the message bytes unless ``writable``; BFLOAT16 comes back as
    ``ml_dtypes.bfloat16`` when installed, else as its uint16 bit pattern. torch: a
    ``torch.frombuffer`` view (read-only by contract unless ``writable``), dtype exact.
    Raises :class:`TensorCodecError` for an unknown dtype, a negative dimension, or data
    whose length is not prod(shape) * itemsize.
    """
    data: bytes = tensor.data  # one access: upb copies on every read
    return from_parts(tensor.dtype, tensor.shape, data, as_torch, writable=writable)


def from_parts(
    dtype: int,
    shape: Sequence[int],
    data: bytes | bytearray | memoryview,
    as_torch: bool = False,
    *,
    writable: bool = False,
) -> Any:
    """:func:`from_wire` for a tensor already split into dtype, shape and data buffer
    (e.g. a view into a received message that was never parsed by protobuf)."""
    nbytes = data.nbytes if isinstance(data, memoryview) else len(data)
    checked = _validated_shape(dtype, shape, nbytes)
    if writable:
        data = bytearray(data)
    if as_torch:
        return _torch_from_bytes(data, dtype, checked)
    array = np.frombuffer(data, dtype=_LE_NUMPY[dtype]).reshape(checked)
    if _BIG_ENDIAN_HOST:
        array = array.astype(array.dtype.newbyteorder("="))
    if dtype != _BFLOAT16:
        return array
    bf16 = _ml_dtypes_bfloat16()
    return array.view(bf16) if bf16 is not None else array


def _torch_from_bytes(
    data: bytes | bytearray | memoryview, dtype: int, shape: tuple[int, ...]
) -> torch.Tensor:
    import torch

    t_dtype = torch_dtype(dtype)
    if len(data) == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=t_dtype)
    if _BIG_ENDIAN_HOST:  # into native order: one copy, into a writable buffer
        swapped = np.frombuffer(data, dtype=_LE_NUMPY[dtype]).byteswap()
        return torch.frombuffer(swapped.data, dtype=t_dtype).reshape(shape)
    global _readonly_warning_spent
    if (_readonly_warning_spent or isinstance(data, bytearray)
            or (isinstance(data, memoryview) and not data.readonly)):
        return torch.frombuffer(data, dtype=t_dtype).reshape(shape)  # writable: no warning
    with warnings.catch_warnings():
        # Documented above: the view is read-only by contract, not by flag. torch warns
        # once per process: after that the filter (5 us a call) is not needed.
        warnings.filterwarnings("ignore", message=_TORCH_READONLY_WARNING, category=UserWarning)
        tensor = torch.frombuffer(data, dtype=t_dtype).reshape(shape)
    _readonly_warning_spent = True
    return tensor
