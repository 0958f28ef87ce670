"""API keys, the per-caller rate limit and shared-memory ownership on the Open Inference
Protocol door, with unmodified tritonclient against a real `moe-router serve`."""

from __future__ import annotations

import uuid

import pytest
from oip_calls import hidden, infer_input
from server_process import clean_env, small_routers, start_server, write_config

from moe_router_client import RouterClient

triton = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEYS = ("oip-key-alpha-5d1c", "oip-key-beta-88a0", "oip-key-gamma-0b7e")
RATE_PER_HOUR = 120  # a burst of 2 calls per key


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("oip-keys")
    mixtral = [r for r in small_routers() if r["name"] == "mixtral"]
    config = write_config(
        tmp / "config.yaml", mixtral, cache={"enabled": False},
        security={"api_key_required": True, "rate_limit": RATE_PER_HOUR},
    )
    server = start_server(config, clean_env(DYNAMIC_MOE_API_KEYS=",".join(KEYS)))
    yield server
    server.terminate()


@pytest.fixture
def client(keyed):
    with triton.InferenceServerClient(keyed.target) as c:
        yield c


def infer(client, key: str | None, **kwargs):
    x = hidden((2, 64), seed=90)
    return client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                        headers=bearer(key) if key else None, **kwargs)


def test_probes_need_no_key_but_everything_else_does(client):
    assert client.is_server_live() and client.is_server_ready()
    for call in (lambda: client.is_model_ready("mixtral"),
                 lambda: client.get_model_metadata("mixtral"),
                 lambda: client.get_system_shared_memory_status(),
                 lambda: infer(client, None)):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "missing API key" in raised.value.message()
    assert client.is_model_ready("mixtral", headers=bearer(KEYS[2]))


def test_a_wrong_key_is_unauthenticated(client):
    with pytest.raises(InferenceServerException) as raised:
        infer(client, "not-a-key")
    assert raised.value.status() == "StatusCode.UNAUTHENTICATED"


def test_one_rate_limit_bucket_per_key_across_both_doors(client, keyed):
    with RouterClient(keyed.target, api_key=KEYS[0], timeout=30, retries=0) as router:
        for _ in range(2):  # the burst, spent through Route
            router.route("mixtral", hidden((2, 64)))
    with pytest.raises(InferenceServerException) as raised:
        infer(client, KEYS[0])
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "rate limit" in raised.value.message()
    assert infer(client, KEYS[1]).as_numpy("expert_indices").shape == (2, 2)


def test_a_region_belongs_to_the_key_that_registered_it(client):
    suffix = uuid.uuid4().hex[:10]
    name, key = f"owned-{suffix}", f"/moe-router-oip-owned-{suffix}"
    handle = shm.create_shared_memory_region(name, key, 512)
    try:
        client.register_system_shared_memory(name, key, 512, headers=bearer(KEYS[2]))
        assert name in client.get_system_shared_memory_status(headers=bearer(KEYS[2])).regions
        assert name not in client.get_system_shared_memory_status(headers=bearer(KEYS[1])).regions
        tensor = triton.InferInput("hidden_states", [2, 64], "FP32")
        tensor.set_shared_memory(name, 512)
        with pytest.raises(InferenceServerException) as raised:
            client.infer("mixtral", [tensor], headers=bearer(KEYS[1]))
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "is not registered" in raised.value.message()
        client.unregister_system_shared_memory(headers=bearer(KEYS[1]))  # not theirs to remove
        assert name in client.get_system_shared_memory_status(headers=bearer(KEYS[2])).regions
    finally:
        client.unregister_system_shared_memory(name, headers=bearer(KEYS[2]))
        shm.destroy_shared_memory_region(handle)
