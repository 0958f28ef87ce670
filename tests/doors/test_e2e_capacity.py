"""Capacity routers over a real server: pad_to_capacity's expert token lists travel on
the wire (fixed shapes, -1 padding) and equal the in-process router's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inprocess_server import serve_in_process
from server_process import write_config

from moe_router.config import load_config
from moe_router.loading.registry import load_routers
from moe_router_client import RouterClient

ROUTERS = [
    {"name": "megatron", "kind": "top_k", "input_dim": 32, "num_experts": 8, "top_k": 2,
     "capacity_factor": 1.0, "pad_to_capacity": True, "weights": {"init": "random", "seed": 1}},
    {"name": "switch", "kind": "top_k", "input_dim": 32, "num_experts": 4, "top_k": 1,
     "renormalize": False, "expert_capacity": 2, "capacity_scope": "sequence",
     "drop_policy": "position", "pad_to_capacity": True,
     "weights": {"init": "random", "seed": 2}},
    {"name": "nllb", "kind": "top_k", "input_dim": 32, "num_experts": 4, "top_k": 2,
     "expert_capacity": 3, "capacity_priority": "slot", "renormalize_after_drop": True,
     "weights": {"init": "random", "seed": 3}},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("capacity")
    config = write_config(tmp / "config.yaml", ROUTERS, cache={"enabled": False})
    hosted = load_routers(load_config(config, env={}))
    with serve_in_process(config) as server, RouterClient(server.target, timeout=30) as client:
        yield client, hosted


def _in_process(hosted, name: str, x: torch.Tensor):
    with torch.inference_mode():
        return hosted[name].layers[0](x)


@pytest.mark.parametrize(
    ("router", "shape", "table"),
    [("megatron", (24,), (8, 6)),       # C = ceil(24 * 2 / 8 * 1.0) = 6
     ("switch", (3, 8), (4, 3 * 2))],   # 3 sequences x capacity 2
)
def test_expert_token_lists_arrive_in_fixed_shapes(served, router, shape, table):
    client, hosted = served
    x = torch.randn(*shape, 32, generator=torch.Generator().manual_seed(5))
    result = client.route(router, x.numpy())
    expected = _in_process(hosted, router, x)
    assert result.expert_tokens.dtype == np.int32
    assert result.expert_tokens.shape == table
    np.testing.assert_array_equal(result.expert_tokens, expected.expert_tokens.numpy())
    np.testing.assert_array_equal(result.expert_token_weights,
                                  expected.expert_token_weights.numpy())
    np.testing.assert_array_equal(result.expert_indices, expected.expert_indices.numpy())
    # The lists are the token-centric answer turned around: each kept (token, expert)
    # pair once, with its weight; -1 and 0 elsewhere.
    flat_indices = result.expert_indices.reshape(-1, result.expert_indices.shape[-1])
    flat_weights = result.expert_weights.reshape(flat_indices.shape)
    pairs = {(t, int(e)): float(w)
             for t, (row, weights) in enumerate(zip(flat_indices, flat_weights, strict=True))
             for e, w in zip(row, weights, strict=True) if e >= 0}
    listed = {(int(result.expert_tokens[e, c]), e): float(result.expert_token_weights[e, c])
              for e, c in zip(*np.nonzero(result.expert_tokens >= 0), strict=True)}
    assert listed == pairs
    assert np.all(result.expert_token_weights[result.expert_tokens < 0] == 0)
    # Top-k selects k experts for every token; what is not listed was dropped.
    assert result.info.dropped_tokens == flat_indices.size - len(pairs) > 0


def test_a_router_without_pad_to_capacity_sends_no_lists(served):
    client, hosted = served
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(6))
    result = client.route("nllb", x.numpy())
    assert result.expert_tokens is None and result.expert_token_weights is None
    expected = _in_process(hosted, "nllb", x)
    np.testing.assert_array_equal(result.expert_weights, expected.expert_weights.numpy())
    kept = result.expert_indices >= 0
    sums = result.expert_weights.sum(-1)
    np.testing.assert_allclose(sums[kept.any(-1)], 1.0, rtol=1e-6)  # renormalised after


def test_capacity_routers_are_not_batched_across_requests(served):
    client, _ = served
    described = {r.name: r for r in client.list_routers()}
    assert not any(described[name].batches_across_requests for name in described)
