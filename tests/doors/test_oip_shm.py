"""Triton's system shared-memory extension through unmodified `tritonclient`: regions made
with `tritonclient.utils.shared_memory`, registered, used for inputs and outputs, and
unregistered, against a real `moe-router serve`; answers equal to Route's."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from oip_calls import assert_same_bits, hidden, infer_input

from moe_router_client import RouterClient

triton = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


@pytest.fixture(scope="module")
def client(oip_server) -> Iterator:
    with triton.InferenceServerClient(oip_server.target) as c:
        yield c
        c.unregister_system_shared_memory()


@pytest.fixture
def region(client):
    """Make a region with tritonclient's helper and register it: ``region(size)`` returns
    (name, key, handle); all are unregistered and destroyed afterwards."""
    made = []

    def make(byte_size: int, register: bool = True):
        suffix = uuid.uuid4().hex[:10]
        name, key = f"region-{suffix}", f"/moe-router-oip-{suffix}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append((name, handle))
        if register:
            client.register_system_shared_memory(name, key, byte_size)
        return name, key, handle

    yield make
    for name, handle in made:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)


def status_names(client) -> set[str]:
    return {r.name for r in client.get_system_shared_memory_status().regions.values()}


@pytest.mark.parametrize("datatype", ["FP32", "BF16"])
def test_inputs_and_outputs_in_shared_memory_equal_route(
    client, oip_server, region, datatype
):
    x = hidden((8, 64), datatype, seed=80)
    in_name, _, in_handle = region(x.nbytes)
    shm.set_shared_memory_region(in_handle, [x])
    # One output region for all three: indices [8, 2] int32, weights [8, 2] fp32, k [8].
    out_name, _, out_handle = region(64 + 64 + 32)
    tensor = triton.InferInput("hidden_states", list(x.shape), datatype)
    tensor.set_shared_memory(in_name, x.nbytes)
    outputs = []
    for name, offset, size in (("expert_indices", 0, 64), ("expert_weights", 64, 64),
                               ("num_experts_per_token", 128, 32)):
        output = triton.InferRequestedOutput(name)
        output.set_shared_memory(out_name, size, offset=offset)
        outputs.append(output)
    result = client.infer("mixtral", [tensor], outputs=outputs,
                          parameters={"layer": 1, "skip_cache": True})

    with RouterClient(oip_server.target, timeout=30) as router:
        expected = router.route("mixtral", x, layer=1, skip_cache=True)
    assert_same_bits(shm.get_contents_as_numpy(out_handle, np.int32, [8, 2], 0),
                     expected.expert_indices)
    assert_same_bits(shm.get_contents_as_numpy(out_handle, np.float32, [8, 2], 64),
                     expected.expert_weights)
    assert_same_bits(shm.get_contents_as_numpy(out_handle, np.int32, [8], 128),
                     expected.num_experts_per_token)
    response = result.get_response()
    assert list(response.raw_output_contents) == [b"", b"", b""]  # the data is in the region
    weights = result.get_output("expert_weights")
    assert list(weights.shape) == [8, 2]
    assert weights.parameters["shared_memory_region"].string_param == out_name


def test_an_output_in_shared_memory_beside_one_in_the_response(client, region):
    x = hidden((4, 64), seed=81)
    out_name, _, out_handle = region(32)
    indices = triton.InferRequestedOutput("expert_indices")
    indices.set_shared_memory(out_name, 32)
    result = client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                          outputs=[indices, triton.InferRequestedOutput("expert_weights")])
    reference = client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")])
    assert_same_bits(shm.get_contents_as_numpy(out_handle, np.int32, [4, 2]),
                     reference.as_numpy("expert_indices"))
    # raw_output_contents stays aligned with outputs, so as_numpy finds the second one
    assert_same_bits(result.as_numpy("expert_weights"), reference.as_numpy("expert_weights"))


def test_the_server_reads_the_region_in_place(client, region):
    """Writing new hidden states into the registered region changes the next answer:
    the server maps the caller's pages, it kept no copy."""
    first, second = hidden((4, 64), seed=82), hidden((4, 64), seed=83)
    in_name, _, in_handle = region(first.nbytes)

    def infer_from_region():
        tensor = triton.InferInput("hidden_states", [4, 64], "FP32")
        tensor.set_shared_memory(in_name, first.nbytes)
        return client.infer("mixtral", [tensor], parameters={"skip_cache": True})

    shm.set_shared_memory_region(in_handle, [first])
    from_first = infer_from_region()
    shm.set_shared_memory_region(in_handle, [second])
    from_second = infer_from_region()
    direct = client.infer("mixtral", [infer_input(triton, "hidden_states", second, "FP32")])
    assert_same_bits(from_second.as_numpy("router_logits"), direct.as_numpy("router_logits"))
    assert from_first.as_numpy("router_logits").tobytes() != direct.as_numpy(
        "router_logits").tobytes()


def test_status_and_unregister(client, region):
    name, key, _ = region(256)
    (status,) = client.get_system_shared_memory_status(region_name=name).regions.values()
    assert (status.name, status.key, status.offset, status.byte_size) == (name, key, 0, 256)
    assert name in status_names(client)
    client.unregister_system_shared_memory(name)
    assert name not in status_names(client)
    client.unregister_system_shared_memory(name)  # unknown name: nothing to do, no error
    with pytest.raises(InferenceServerException) as raised:
        client.get_system_shared_memory_status(region_name=name)
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def _infer_error(client, tensor, outputs=None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("mixtral", [tensor], outputs=outputs)
    return raised.value


def _shm_input(name: str, byte_size: int, offset: int = 0, shape=(4, 64)):
    tensor = triton.InferInput("hidden_states", list(shape), "FP32")
    return tensor.set_shared_memory(name, byte_size, offset=offset)


def test_a_taken_name_is_already_exists(client, region):
    name, key, _ = region(64)
    with pytest.raises(InferenceServerException) as raised:
        client.register_system_shared_memory(name, key, 64)
    assert raised.value.status() == "StatusCode.ALREADY_EXISTS"


def test_registering_past_the_end_or_an_absent_key_is_invalid(client, region):
    _, key, _ = region(64, register=False)
    for region_key, size, says in ((key, 65, "runs past the end"),
                                   ("/moe-router-absent", 8, "no such shared memory object"),
                                   ("/../etc/passwd", 8, "expected one name")):
        with pytest.raises(InferenceServerException) as raised:
            client.register_system_shared_memory(f"bad-{uuid.uuid4().hex[:6]}", region_key, size)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", says
        assert says in raised.value.message()


def test_references_out_of_range_unregistered_or_mis_sized_are_invalid(client, region):
    name, _, _ = region(1024)
    for tensor, says in (
        (_shm_input(name, 1024, offset=512), "outside the region"),
        (_shm_input("never-registered", 1024), "'never-registered' is not registered"),
        (_shm_input(name, 1000), "holds 1000 bytes, expected 1024"),
    ):
        error = _infer_error(client, tensor)
        assert error.status() == "StatusCode.INVALID_ARGUMENT", says
        assert says in error.message()


def test_an_output_region_too_small_is_invalid(client, region):
    out_name, _, _ = region(16)
    output = triton.InferRequestedOutput("expert_indices")
    output.set_shared_memory(out_name, 16)
    error = _infer_error(client, infer_input(triton, "hidden_states", hidden((4, 64)), "FP32"),
                         outputs=[output])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "gives 16 bytes, the result needs 32" in error.message()


def test_a_region_shrunk_after_registering_is_refused_and_the_server_lives(client, region):
    name, key, _ = region(4096)
    os.truncate(Path("/dev/shm") / key.lstrip("/"), 1024)
    error = _infer_error(client, _shm_input(name, 1024))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "was resized to 1024 bytes" in error.message()
    assert client.is_server_live()
