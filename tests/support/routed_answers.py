"""One comparison of two doors' answers: every tensor bit for bit, and the scalars."""

from __future__ import annotations

import numpy as np

from moe_router_client import RouteResult

TENSORS = ("expert_indices", "expert_weights", "num_experts_per_token", "complexity_scores",
           "router_logits", "dispatch_weights", "combine_weights")


def assert_same_answer(got: RouteResult, expected: RouteResult) -> None:
    """Every tensor bit for bit (dtype, shape, bytes), and the routing scalars."""
    for name in TENSORS:
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            a, b = np.asarray(a), np.asarray(b)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), name
            assert a.tobytes() == b.tobytes(), name
    for field in ("aux_loss", "z_loss", "tokens_per_expert", "dropped_tokens",
                  "router_version", "layer"):
        assert getattr(got.info, field) == getattr(expected.info, field), field
