"""A hash router over real gRPC: input_ids travel in RouteRequest, bad ones are
INVALID_ARGUMENT naming input_ids, and other routers refuse them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hash_router import VOCAB, D, K, write_hash_router
from inprocess_server import serve_in_process
from server_process import small_routers, write_config

from moe_router_client import RouterClient
from moe_router_client.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hash")
    router = write_hash_router(tmp)
    hashed, gate, table = router.entry, router.gate, router.table
    config = write_config(tmp / "config.yaml", [hashed, small_routers()[0]],
                          cache={"enabled": False})
    with serve_in_process(config) as server, RouterClient(server.target, timeout=30) as client:
        yield client, gate, table, server.target


def test_the_hash_router_routes_by_the_ids_sent(served):
    client, gate, table, _ = served
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 0, 31], [7, 7, 2]], dtype=torch.int32)
    result = client.route("hashed", x.numpy(), input_ids=ids.numpy())
    assert np.array_equal(result.expert_indices, table[ids.long()].numpy())
    scores = torch.nn.functional.softplus(x.reshape(-1, D) @ gate.T).sqrt()
    chosen = scores.gather(1, table[ids.reshape(-1).long()])
    expected = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * 1.5
    np.testing.assert_allclose(result.expert_weights.reshape(-1, K), expected.numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(("ids", "match"), [
    (None, r"input_ids: router 'hashed' routes by token id and needs input_ids, an INT32 "
           r"or INT64 tensor of shape \[4\]"),
    (np.array([1, 2, 3], dtype=np.int64), r"input_ids: must be .* got shape \[3\]"),
    (np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32), r"input_ids: must be .* got dtype"),
    (np.array([0, 1, 2, VOCAB], dtype=np.int64), r"input_ids: token ids must be in \[0, 32\)"),
])
def test_wrong_input_ids_are_invalid_argument_naming_them(served, ids, match):
    client, _, _, _ = served
    with pytest.raises(InvalidArgumentError, match=match):
        client.route("hashed", np.zeros((4, D), np.float32), input_ids=ids)


def test_a_router_that_does_not_hash_refuses_input_ids(served):
    client, _, _, _ = served
    with pytest.raises(InvalidArgumentError, match="input_ids: router 'mixtral' does not "
                       "route by token id"):
        client.route("mixtral", np.zeros((4, 64), np.float32),
                     input_ids=np.arange(4, dtype=np.int64))


def test_tritonclient_sends_input_ids_to_the_hash_router_and_gets_routes_answer(served):
    """The OIP door takes input_ids like Route: same experts and weights, bit for bit."""
    import tritonclient.grpc as triton

    client, _, _, target = served
    x = np.random.default_rng(3).standard_normal((4, D), dtype=np.float32)
    ids = np.array([3, 9, 31, 0], dtype=np.int64)
    expected = client.route("hashed", x, input_ids=ids)
    with triton.InferenceServerClient(target) as oip:
        metadata = oip.get_model_metadata("hashed")
        assert [i.name for i in metadata.inputs] == ["hidden_states", "input_ids"]
        inputs = [triton.InferInput("hidden_states", list(x.shape), "FP32"),
                  triton.InferInput("input_ids", list(ids.shape), "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(ids)
        answer = oip.infer("hashed", inputs)
        assert answer.as_numpy("expert_indices").tobytes() == expected.expert_indices.tobytes()
        assert answer.as_numpy("expert_weights").tobytes() == expected.expert_weights.tobytes()
        missing = [triton.InferInput("hidden_states", list(x.shape), "FP32")]
        missing[0].set_data_from_numpy(x)
        with pytest.raises(triton.InferenceServerException, match="needs input_ids"):
            oip.infer("hashed", missing)
