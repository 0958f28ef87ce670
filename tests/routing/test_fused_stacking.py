"""Calls of one pass stacked into one fused op call (``TopKRouter.route_many_validated``).

The serving chain merges concurrent calls into one pass; where the fused op routes them,
their rows go through one op call, so a wide gate is read once per pass rather than once
per call. Checked here: each call's answer, counts, verdict and statistics are those of
routing it alone, bit for bit; the op is called once; and stacking stops where it would
copy more than it saves (a narrow gate) or where a call asks for losses.
"""

from __future__ import annotations

import pytest
import torch
from fused_op_build import needs_op

from moe_router.routing import (
    GroupedTopKRouter,
    RouterConfig,
    ScoringFunction,
    TopKRouter,
    fused_topk,
)
from moe_router.routing.router_config import GroupScore

pytestmark = needs_op

FIELDS = ("expert_indices", "expert_weights", "num_experts_per_token", "router_logits",
          "tokens_per_expert")


def _wide(dim: int = 32) -> GroupedTopKRouter:
    """A DeepSeek-V3-like router: 64 experts in 8 groups, sigmoid, correction bias."""
    torch.manual_seed(3)
    router = GroupedTopKRouter(
        RouterConfig(hidden_size=dim, num_experts=64, top_k=8, n_group=8, topk_group=4,
                     scoring=ScoringFunction.SIGMOID, group_score=GroupScore.TOP2_SUM,
                     routed_scaling_factor=2.5),
        use_correction_bias=True,
    ).eval()
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.randn(64) * 0.1)
    return router


@pytest.fixture
def op_calls(monkeypatch) -> list[int]:
    """How many times the real fused route op runs (each call's row count)."""
    assert fused_topk.kernel_available()
    seen: list[int] = []
    real = fused_topk.topk_route

    def counted(x, *args, **kwargs):
        seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fused_topk, "topk_route", counted)
    return seen


def _route_both(make, calls: list[torch.Tensor], losses=None):
    """(merged answers, answers alone, the two routers' statistics) from two routers
    ``make()`` builds alike."""
    router, alone_router = make(), make()
    with torch.inference_mode():
        merged = router.route_many(calls, return_losses=losses)
        wants = losses if isinstance(losses, list) else [losses] * len(calls)
        alone = [alone_router(c, return_losses=bool(w)) for c, w in zip(calls, wants, strict=True)]
    return merged, alone, router.get_stats(), alone_router.get_stats()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as its bit patterns when floating (NaN then equals the same NaN)."""
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(merged, alone) -> None:
    for got, want in zip(merged, alone, strict=True):
        for name in FIELDS:
            assert torch.equal(_bits(getattr(got, name)), _bits(getattr(want, name))), name
        assert got.logits_bounded == want.logits_bounded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calls_of_a_wide_gate_share_one_op_call_and_answer_as_alone(op_calls, dtype) -> None:
    sizes = (1, 3, 1, 5, 2, 1, 1)  # 14 rows: under the 64 x 4 bytes the gate has per dim
    calls = [torch.randn(n, 32).to(dtype) for n in sizes]
    merged, alone, merged_stats, alone_stats = _route_both(_wide, calls)
    assert op_calls[:1] == [sum(sizes)]  # one op call for the pass, then one per call alone
    assert len(op_calls) == 1 + len(sizes)
    _assert_same(merged, alone)
    assert merged_stats == alone_stats  # load, batches, tokens, assignments


def test_a_b_s_d_call_keeps_its_shape_when_stacked(op_calls) -> None:
    calls = [torch.randn(2, 3, 32), torch.randn(1, 1, 32), torch.randn(4, 32)]
    merged, alone, _, _ = _route_both(_wide, calls)
    assert op_calls[0] == 11
    _assert_same(merged, alone)
    assert merged[0].expert_indices.shape == (2, 3, 8)


def test_stacking_stops_where_the_copy_outgrows_the_gate(op_calls) -> None:
    """Mixtral's gate has 8 experts: 32 bytes per hidden dim. Stacked, calls of 16 fp32
    tokens would copy 64 bytes per dim each to save reading 32, so each is an op call."""
    def mixtral_like() -> TopKRouter:
        torch.manual_seed(0)
        return TopKRouter(RouterConfig(hidden_size=64, num_experts=8, top_k=2)).eval()

    calls = [torch.randn(16, 64) for _ in range(3)]
    merged, alone, merged_stats, alone_stats = _route_both(mixtral_like, calls)
    assert op_calls == [16] * 6  # three in the pass, three alone
    _assert_same(merged, alone)
    assert merged_stats == alone_stats
    op_calls.clear()
    ones = [torch.randn(1, 64) for _ in range(10)]  # 4 bytes per dim each: 7 fit in 32
    merged, alone, _, _ = _route_both(mixtral_like, ones)
    assert op_calls[:4] == [7, 1, 1, 1]
    _assert_same(merged, alone)


def test_a_call_asking_for_losses_takes_its_own_op_call(op_calls) -> None:
    calls = [torch.randn(1, 32) for _ in range(4)]
    wants = [False, True, False, False]
    merged, alone, _, _ = _route_both(_wide, calls, losses=wants)
    assert op_calls[:2] == [3, 1]
    _assert_same(merged, alone)
    assert merged[1].aux_loss is not None and torch.equal(merged[1].aux_loss, alone[1].aux_loss)
    assert merged[0].aux_loss is None


# 1e30: logits past the bound, yet finite
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_only_the_call_with_an_unbounded_logit_is_flagged(op_calls, value) -> None:
    calls = [torch.randn(1, 32) for _ in range(3)]
    calls[1][0, 5] = value
    merged, alone, _, _ = _route_both(_wide, calls)
    assert op_calls[0] == 3
    assert [m.logits_bounded for m in merged] == [True, False, True]
    _assert_same(merged, alone)
