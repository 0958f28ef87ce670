"""The wire codec: exact round trips per dtype and shape, byte layout, and malformed Tensors."""

from __future__ import annotations

import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router_client import tensors
from moe_router_client.tensors import (
    WIRE_DTYPES,
    DType,
    TensorCodecError,
    from_wire,
    numpy_dtype,
    to_wire,
    torch_dtype,
    wire_dtype_of_numpy,
    wire_dtype_of_torch,
)
from moe_router_client.v1 import router_pb2 as pb

SHAPES = [(5, 8), (2, 3, 8)]
NUMPY_DTYPES = [np.float32, np.float16, np.int32, np.int64]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]


def _over_the_wire(tensor: pb.Tensor) -> pb.Tensor:
    """Serialize and parse, as gRPC does, so nothing aliases the sender's message."""
    return pb.Tensor.FromString(tensor.SerializeToString())


def _numpy_values(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def _torch_values(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip_is_exact(dtype: type, shape: tuple[int, ...]) -> None:
    array = _numpy_values(dtype, shape)
    back = from_wire(_over_the_wire(to_wire(array)))
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _torch_values(dtype, shape)
    back = from_wire(_over_the_wire(to_wire(tensor)), as_torch=True)
    assert back.dtype == dtype
    torch.testing.assert_close(back, tensor, rtol=0, atol=0)


def test_bf16_from_ml_dtypes_and_from_torch_carry_the_same_bytes() -> None:
    values = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    as_ml = values.float().numpy().astype(ml_dtypes.bfloat16)  # exact: values are bf16 already
    wire_torch, wire_ml = to_wire(values), to_wire(as_ml)
    assert wire_ml.dtype == wire_torch.dtype == pb.BFLOAT16
    assert wire_ml.data == wire_torch.data
    back = from_wire(_over_the_wire(wire_ml))
    assert back.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back.astype(np.float32), values.float().numpy())
    torch.testing.assert_close(from_wire(wire_ml, as_torch=True), values, rtol=0, atol=0)


def test_bf16_as_uint16_bits_needs_the_explicit_dtype() -> None:
    values = torch.tensor([[1.0, -2.5, 0.15625]], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    with pytest.raises(TensorCodecError, match="dtype=DType.BFLOAT16"):
        to_wire(bits)
    wire = to_wire(bits, dtype=DType.BFLOAT16)
    assert wire.dtype == pb.BFLOAT16
    torch.testing.assert_close(from_wire(wire, as_torch=True), values, rtol=0, atol=0)


def test_bf16_numpy_output_without_ml_dtypes_is_the_uint16_bit_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wire = to_wire(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    monkeypatch.setattr(tensors, "_ml_dtypes_bfloat16", lambda: None)
    back = from_wire(wire)
    assert back.dtype == np.uint16
    assert back.tolist() == [0x3F80, 0xC000]  # bf16 1.0 and -2.0


def test_byte_layout_is_row_major_little_endian() -> None:
    cases = [
        (np.array([[1.5, -2.0], [0.25, 8.0]], np.float32),
         struct.pack("<4f", 1.5, -2.0, 0.25, 8.0)),
        (np.array([[1.5, -2.0]], np.float16), struct.pack("<2e", 1.5, -2.0)),
        (np.array([[7, -1]], np.int32), struct.pack("<2i", 7, -1)),
        (np.array([[1, -2, 2**40]], np.int64), struct.pack("<3q", 1, -2, 2**40)),
        # bf16 is the upper half of the float32 pattern: 1.0 -> 0x3F80, -2.0 -> 0xC000
        (np.array([[1.0, -2.0]], ml_dtypes.bfloat16), struct.pack("<2H", 0x3F80, 0xC000)),
    ]
    for array, expected in cases:
        wire = to_wire(array)
        assert wire.data == expected, array.dtype
        assert list(wire.shape) == list(array.shape)
    torch_bf16 = to_wire(torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16))
    assert torch_bf16.data == struct.pack("<2H", 0x3F80, 0xC000)


def test_big_endian_input_is_sent_little_endian() -> None:
    native = np.array([[1.5, -2.0, 3.0]], np.float32)
    wire = to_wire(native.astype(">f4"))
    assert wire.data == struct.pack("<3f", 1.5, -2.0, 3.0)
    np.testing.assert_array_equal(from_wire(wire), native)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0,)])
def test_empty_tensors_round_trip(shape: tuple[int, ...]) -> None:
    array = np.zeros(shape, np.float32)
    wire = _over_the_wire(to_wire(array))
    assert wire.data == b""
    assert from_wire(wire).shape == shape
    tensor = from_wire(wire, as_torch=True)
    assert tensor.shape == shape
    assert tensor.dtype == torch.float32
    assert to_wire(torch.zeros(shape, dtype=torch.bfloat16)).data == b""


def test_non_contiguous_inputs_are_sent_as_their_values() -> None:
    base = _torch_values(torch.float32, (6, 8))
    for view in (base.t(), base[:, ::2], base.t()[1:, :3]):
        assert not view.is_contiguous()
        assert to_wire(view).data == to_wire(view.contiguous()).data
        torch.testing.assert_close(from_wire(to_wire(view), as_torch=True), view, rtol=0, atol=0)
    bf16 = base.to(torch.bfloat16).t()
    torch.testing.assert_close(from_wire(to_wire(bf16), as_torch=True), bf16, rtol=0, atol=0)
    array = base.numpy()[::2, 1::3]
    np.testing.assert_array_equal(from_wire(to_wire(array)), array)


def test_tensor_requiring_grad_is_sent_detached() -> None:
    weights = torch.randn(3, 4, requires_grad=True)
    torch.testing.assert_close(from_wire(to_wire(weights), as_torch=True), weights.detach())


def test_scalar_tensor_round_trips() -> None:
    wire = to_wire(np.array(3.5, np.float32))
    assert list(wire.shape) == [] and wire.data == struct.pack("<f", 3.5)
    assert from_wire(wire).item() == 3.5


def test_out_fills_a_message_field_in_place() -> None:
    request = pb.RouteRequest(router="r")
    to_wire(np.ones((3, 4), np.float32), out=request.hidden_states)
    to_wire(np.ones((2,), np.int64), out=request.hidden_states)  # reuse: shape is replaced
    assert request.HasField("hidden_states")
    assert list(request.hidden_states.shape) == [2]
    np.testing.assert_array_equal(from_wire(request.hidden_states), [1, 1])


def test_numpy_output_is_read_only_unless_writable() -> None:
    wire = to_wire(np.arange(4, dtype=np.float32))
    view = from_wire(wire)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1.0
    own = from_wire(wire, writable=True)
    own[0] = 9.0
    assert own[0] == 9.0 and from_wire(wire)[0] == 0.0
    owned_tensor = from_wire(wire, as_torch=True, writable=True)
    owned_tensor.add_(1)
    assert owned_tensor.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_torch_decode_emits_no_non_writable_buffer_warning() -> None:
    """In a fresh process (torch warns only once per process), with warnings as errors."""
    code = (
        "import numpy as np\n"
        "from moe_router_client.tensors import from_wire, to_wire\n"
        "t = from_wire(to_wire(np.arange(3, dtype=np.float32)), as_torch=True)\n"
        "assert t.tolist() == [0.0, 1.0, 2.0]\n"
    )
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("tensor", "needles"),
    [
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[2], data=bytes(8)),
         ["Tensor.dtype", "DTYPE_UNSPECIFIED", "FLOAT32"]),
        (pb.Tensor(dtype=42, shape=[2], data=bytes(8)), ["Tensor.dtype", "42"]),
        (pb.Tensor(dtype=pb.FLOAT32, shape=[2, -3], data=b""),
         ["Tensor.shape", "dimension 1 is -3"]),
        (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=bytes(10)),
         ["Tensor.data", "holds 10 bytes", "expected 24", "FLOAT32"]),
        (pb.Tensor(dtype=pb.INT64, shape=[2], data=bytes(24)),
         ["Tensor.data", "holds 24 bytes", "expected 16"]),
        (pb.Tensor(dtype=pb.BFLOAT16, shape=[0, 4], data=bytes(2)),
         ["Tensor.data", "holds 2 bytes", "expected 0"]),
    ],
    ids=["unspecified-dtype", "unknown-dtype", "negative-dim", "short-data", "long-data",
         "data-for-empty"],
)
def test_malformed_tensor_raises_naming_the_problem(tensor: pb.Tensor, needles: list[str]) -> None:
    for as_torch in (False, True):
        with pytest.raises(TensorCodecError) as info:
            from_wire(tensor, as_torch=as_torch)
        for needle in needles:
            assert needle in str(info.value)
    assert issubclass(TensorCodecError, ValueError)


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "needle"),
    [
        (np.zeros(3, np.float64), {}, TensorCodecError, "float64"),
        (np.zeros(3, bool), {}, TensorCodecError, "bool"),
        (torch.zeros(3, dtype=torch.float64), {}, TensorCodecError, "torch.float64"),
        (np.zeros(3, np.float32), {"dtype": DType.FLOAT16}, TensorCodecError, "does not match"),
        (np.zeros(3, np.float32), {"dtype": 9}, TensorCodecError, "dtype: 9"),
        ([1.0, 2.0], {}, TypeError, "list"),
    ],
    ids=["float64", "bool", "torch-float64", "dtype-mismatch", "unknown-dtype-arg", "list"],
)
def test_unsendable_input_is_refused(value: object, kwargs: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        to_wire(value, **kwargs)


def test_dtype_name_mappings_are_inverse() -> None:
    for wire in WIRE_DTYPES:
        assert wire_dtype_of_torch(torch_dtype(wire)) == wire
        assert wire_dtype_of_numpy(numpy_dtype(wire)) == wire  # ml_dtypes installed here
        assert tensors.itemsize(wire) == numpy_dtype(wire).itemsize == torch_dtype(wire).itemsize


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from(NUMPY_DTYPES + [ml_dtypes.bfloat16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_shape_and_dtype_round_trips_exactly(shape: tuple, dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = raw.view(dtype).reshape(shape)  # arbitrary bit patterns, NaNs included
    back = from_wire(_over_the_wire(to_wire(array)))
    assert back.shape == shape and back.dtype == array.dtype
    assert back.tobytes() == array.tobytes()
    tensor = from_wire(to_wire(array), as_torch=True)
    assert tuple(tensor.shape) == shape
    assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == array.tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_moved_to_cpu_for_the_wire() -> None:
    values = _torch_values(torch.bfloat16, (4, 8))
    assert to_wire(values.cuda()).data == to_wire(values).data


def test_read_only_bytes_decode_without_a_warning_first_time_and_after() -> None:
    """torch warns once per process about a read-only buffer; the codec silences that
    one and then stops filtering (a filter per call cost 5 us). A fresh process, with
    every warning an error, decodes read-only bytes three times."""
    script = (
        "import numpy as np, torch\n"
        "from moe_router_client.tensors import from_parts\n"
        "from moe_router_client.v1 import router_pb2 as pb\n"
        "data = np.arange(6, dtype=np.float32).tobytes()\n"
        "for _ in range(3):\n"
        "    t = from_parts(pb.FLOAT32, (2, 3), data, as_torch=True)\n"
        "    assert t.tolist() == [[0, 1, 2], [3, 4, 5]]\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", script], check=True, timeout=120)
