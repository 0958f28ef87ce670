"""The co-located door with CUDA IPC handles: hidden states already on the GPU are routed
where they lie. The checks that refuse a bad reference run everywhere; routing by handle
needs a CUDA device and a server in another process (CUDA refuses to open a process's own
IPC handle), and skips without one."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from colocated_raw import RawDoor
from inprocess_server import serve_in_process
from server_process import ServerProcess, small_routers, start_server, write_config

from moe_router.doors.cuda_ipc import open_cuda_tensor, tensor_extent_bytes
from moe_router.errors import ValidationError
from moe_router_client import CoLocatedClient, RouterClient
from moe_router_client import colocated_wire as wire
from moe_router_client.v1 import router_pb2 as pb

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the door is Linux-only")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REF = wire.CudaIpcRef(0, b"\x00" * 64, 4096, 0, 0, (64, 1), b"", 0, b"", False)


def test_extent_is_the_last_element_in_bytes() -> None:
    assert tensor_extent_bytes((4, 64), (64, 1), 0, 4) == 4 * 64 * 4
    assert tensor_extent_bytes((4, 64), (128, 1), 10, 2) == (10 + 3 * 128 + 63 + 1) * 2
    assert tensor_extent_bytes((0, 64), (64, 1), 5, 4) == 0


def test_a_cpu_server_refuses_cuda_handles() -> None:
    with pytest.raises(ValidationError, match="routes on cpu"):
        open_cuda_tensor(REF, pb.FLOAT32, (4, 64), device=torch.device("cpu"))


@cuda
@pytest.mark.parametrize("shape,ref,dtype,match", [
    ((17, 64), REF, pb.FLOAT32, "reaches byte"),  # 4096 bytes hold 16 rows of 64 fp32
    ((4, 64), wire.CudaIpcRef(0, b"x", 4096, 0, 0, (64, -1), b"", 0, b"", False), pb.FLOAT32,
     "non-negative"),
    ((4, 64), REF, pb.INT32, "expected FLOAT32"),
    ((4, 64), wire.CudaIpcRef(99, b"x", 4096, 0, 0, (64, 1), b"", 0, b"", False), pb.FLOAT32,
     "device 99"),
])
def test_bad_cuda_references_are_refused_before_anything_is_opened(shape, ref, dtype, match):
    with pytest.raises(ValidationError, match=match):
        open_cuda_tensor(ref, dtype, shape, device=torch.device("cuda", 0))


def test_a_cuda_reference_to_a_cpu_server_is_invalid_argument(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_routers()[:1])
    with serve_in_process(config) as server:
        door = RawDoor(server.running.colocated.socket_path)
        door.register_memfd("out", 4096)
        answer = door.route("mixtral", [wire.TensorRef("hidden_states", pb.FLOAT32, (4, 64),
                                                       REF)], wire.RegionRef("out", 0, 4096))
        door.close()
    assert isinstance(answer, wire.Error) and answer.code == "INVALID_ARGUMENT"
    assert "routes on cpu" in answer.message


@pytest.fixture(scope="module")
def cuda_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    config = write_config(tmp_path_factory.mktemp("cuda") / "config.yaml", small_routers(),
                          server={"device": "cuda"})
    server = start_server(config)
    yield server
    server.terminate()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_tensors_are_routed_in_place_with_routes_bits(cuda_server, dtype) -> None:
    with CoLocatedClient(cuda_server.target, timeout=60) as client, \
            RouterClient(cuda_server.target, timeout=60) as grpc_client:
        assert client.transport == "colocated"
        for tokens in (1, 64, 2048):
            x = torch.randn(tokens, 64, device="cuda").to(dtype)
            got = client.route("mixtral", x, layer=1, skip_cache=True)
            expected = grpc_client.route("mixtral", x.cpu(), layer=1, skip_cache=True)
            assert got.expert_indices.tobytes() == expected.expert_indices.tobytes()
            assert got.expert_weights.tobytes() == expected.expert_weights.tobytes()
        view = torch.randn(8, 128, device="cuda")[:, 32:96]  # strided: a view into a buffer
        got = client.route("mixtral", view, skip_cache=True)
        expected = grpc_client.route("mixtral", view.cpu(), skip_cache=True)
        assert np.array_equal(got.expert_indices, expected.expert_indices)


@cuda
def test_cuda_tensors_to_a_cpu_server_go_through_a_host_region(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_routers()[:1])
    server = start_server(config)
    try:
        with CoLocatedClient(server.target, timeout=60) as client, \
                RouterClient(server.target, timeout=60) as grpc_client:
            x = torch.randn(16, 64, device="cuda")
            got = client.route("mixtral", x, skip_cache=True)
            expected = grpc_client.route("mixtral", x.cpu(), skip_cache=True)
        assert got.expert_weights.tobytes() == expected.expert_weights.tobytes()
    finally:
        server.terminate()
