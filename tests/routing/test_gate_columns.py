"""The gate's kept fp32 columns follow the weight: every change a user makes to it (an
in-place update, a load, a new tensor, a move, a dtype change) shows in the next answer,
and training still gets its gradient.

The routers here are kept off the fused CPU route, which reads the weight itself on every
call (tests/routing/test_fused_topk.py): their logits come from the kept columns."""

from __future__ import annotations

import pytest
import torch

from moe_router.routing import RouterConfig, ScoringFunction, TopKRouter
from moe_router.routing import functional as F
from moe_router.routing.gate_columns import KeptGateColumns


def _router(dim: int = 16, experts: int = 6) -> TopKRouter:
    torch.manual_seed(0)
    router = TopKRouter(RouterConfig(hidden_size=dim, num_experts=experts, top_k=2,
                                     renormalize=True, scoring=ScoringFunction.SIGMOID)).eval()
    router._fusable = False  # the batch-invariant matmul on the kept columns
    return router


def _expected_logits(router: TopKRouter, x: torch.Tensor) -> torch.Tensor:
    """The gate logits computed from the weight as it is now, nothing kept: fresh columns
    in the layout the router multiplies this block size by (the view and the contiguous
    copy differ in the last bits on some CPUs)."""
    weight = router.gate.weight.detach()
    rows = F.gate_block_rows(x.shape[0])
    with torch.no_grad():
        columns = KeptGateColumns()(weight, rows)
    return F.batch_invariant_linear(x.float(), weight, block_rows=rows, columns=columns)


def _route(router: TopKRouter, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return router(x).router_logits


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])  # a view / a copy
@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "new_data", "new_parameter",
                                    "to_float16"])
def test_every_weight_change_shows_in_the_next_answer(change: str, weight_dtype) -> None:
    router = _router().to(weight_dtype)
    x = torch.randn(5, 16)
    before = _route(router, x)
    assert torch.equal(_route(router, x), before)  # kept columns: the same answer
    replacement = torch.randn(6, 16).to(weight_dtype)
    with torch.no_grad():
        if change == "in_place":
            router.gate.weight.mul_(-2.0)
        elif change == "load_state_dict":
            router.load_state_dict({**router.state_dict(), "gate.weight": replacement})
        elif change == "new_data":
            router.gate.weight.data = replacement
        elif change == "new_parameter":
            router.gate.weight = torch.nn.Parameter(replacement)
        else:
            router.to(torch.float16)
    after = _route(router, x)
    if not (change == "to_float16" and weight_dtype == torch.bfloat16):  # that one is exact
        assert not torch.equal(after, before)
    assert torch.equal(after, _expected_logits(router, x))


def test_the_columns_are_kept_between_inference_calls() -> None:
    router = _router().to(torch.bfloat16)
    with torch.inference_mode():
        router(torch.randn(2, 16))
        kept = router._gate_columns.kept
        router(torch.randn(3, 16))
    assert kept is not None and router._gate_columns.kept is kept


def test_an_in_place_change_inside_inference_mode_shows_too() -> None:
    router = _router()
    x = torch.randn(3, 16)
    before = _route(router, x)
    with torch.inference_mode():
        router.gate.weight.add_(1.0)  # a normal tensor: its version still counts
        after = router(x).router_logits
    assert not torch.equal(after, before)
    assert torch.equal(after, _expected_logits(router, x))


def test_training_gets_the_gate_gradient_after_inference_calls() -> None:
    router = _router()
    x = torch.randn(4, 16)
    _route(router, x)  # columns kept from an inference call
    router.train()
    out = router(x, return_losses=True)
    (out.expert_weights.sum() + out.aux_loss + out.z_loss).backward()
    assert router.gate.weight.grad is not None
    assert router.gate.weight.grad.abs().sum() > 0


def test_a_router_built_in_inference_mode_routes_without_keeping() -> None:
    with torch.inference_mode():
        router = TopKRouter(RouterConfig(hidden_size=8, num_experts=4, top_k=1,
                                         scoring=ScoringFunction.SIGMOID)).eval()
        x = torch.randn(2, 8)
        first = router(x).router_logits
        router.gate.weight.mul_(3.0)  # an inference tensor: no version to key on
        second = router(x).router_logits
    assert torch.allclose(second, first * 3.0, rtol=1e-5)


@pytest.mark.parametrize(("experts", "rows", "copy"), [
    (8, 1, False), (8, 4, False), (8, 8, True), (256, 1, False), (256, 2, True),
    (256, 64, True)])
def test_which_operand_each_block_size_multiplies_by(experts: int, rows: int, copy: bool):
    """On a CPU: the contiguous [D, E] copy for blocks of 8 rows or more, and for 2 to 7
    rows of a router of 32 experts or more; a one-row block always takes the transposed
    view (module docstring: the copy was slower there)."""
    weight = torch.randn(experts, 64)
    with torch.inference_mode():
        kept = KeptGateColumns()
        columns = kept(weight, rows)
    assert torch.equal(columns, F.gate_columns(weight))
    assert columns.is_contiguous() == copy
