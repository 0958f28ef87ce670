"""The co-located door carries pad_to_capacity's fixed-shape dispatch lists like Route."""

from __future__ import annotations

import numpy as np
import pytest
from inprocess_server import serve_in_process
from server_process import write_config

from moe_router_client import CoLocatedClient, RouterClient

ROUTERS = [
    {"name": "padded", "kind": "top_k", "input_dim": 32, "num_experts": 4, "top_k": 2,
     "capacity_factor": 1.0, "pad_to_capacity": True, "weights": {"init": "random", "seed": 7}},
    {"name": "fixed", "kind": "top_k", "input_dim": 32, "num_experts": 4, "top_k": 2,
     "expert_capacity": 3, "pad_to_capacity": True, "weights": {"init": "random", "seed": 8}},
]


@pytest.mark.parametrize("router", ["padded", "fixed"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_padded_dispatch_lists_equal_routes(tmp_path, router, tokens) -> None:
    config = write_config(tmp_path / "config.yaml", ROUTERS)
    hidden = np.random.default_rng(tokens).standard_normal((tokens, 32), dtype=np.float32)
    with serve_in_process(config) as server:
        with RouterClient(server.target) as grpc_client:
            expected = grpc_client.route(router, hidden, skip_cache=True)
        with CoLocatedClient(server.target, fallback=False) as client:
            got = client.route(router, hidden, skip_cache=True)
    assert expected.expert_tokens is not None
    for name in ("expert_indices", "expert_weights", "expert_tokens", "expert_token_weights"):
        a, b = getattr(expected, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
