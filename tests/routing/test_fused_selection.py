"""The fused ops on grouped, biased and capped routers (the whole route, and the selection
alone on the batch-invariant gate's logits): their answers against the routers' own
PyTorch path, ties to the lower index, merged calls answering as each call alone, and a
bias the op cannot read taking the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from fused_op_build import needs_op
from fused_routes import grouped_router, pytorch_path, top_k_router

from moe_router.routing import RouterConfig, ScoringFunction, TopKRouter, fused_topk
from moe_router.routing.fused_topk import SelectionSpec
from moe_router.routing.router_config import CorrectionBiasTarget, GroupMaskFill, GroupScore

_SELECTIONS = {
    "deepseek-v3": lambda: grouped_router(scoring=ScoringFunction.SIGMOID,
                                    group_score=GroupScore.TOP2_SUM,
                                    routed_scaling_factor=2.5),
    "deepseek-v2": lambda: grouped_router(experts=40, kept=3, k=6, bias=False,
                                    renormalize=False, routed_scaling_factor=16.0),
    "zero fill, negative bias": lambda: grouped_router(scoring=ScoringFunction.SIGMOID,
                                                 group_mask_fill=GroupMaskFill.ZERO),
    "bias on the logits": lambda: grouped_router(
        scoring=ScoringFunction.SIGMOID, correction_bias_target=CorrectionBiasTarget.LOGITS),
    "top-k, sigmoid": lambda: top_k_router(dim=32, experts=16, k=4,
                                      scoring=ScoringFunction.SIGMOID),
    "top-k, bias": lambda: TopKRouter(RouterConfig(hidden_size=32, num_experts=16, top_k=4),
                                      use_correction_bias=True).eval(),
    "top-k, logit cap": lambda: top_k_router(dim=32, experts=16, k=4, logit_softcap=1.5),
    "top-k, gate bias": lambda: top_k_router(dim=32, experts=16, k=4, gate_bias=True),
}


@needs_op
@pytest.mark.parametrize("case", ["deepseek-v3", "deepseek-v2", "zero fill, negative bias",
                                  "bias on the logits", "top-k, sigmoid", "top-k, bias",
                                  "top-k, gate bias"])
def test_the_fused_route_answers_as_the_pytorch_path(case: str) -> None:
    """The op's own gate matmul against the batch-invariant one: logits to float32
    rounding, the same experts, weights and losses to rounding."""
    router = _SELECTIONS[case]()
    if case.startswith("zero"):
        with torch.no_grad():
            router.e_score_correction_bias.fill_(-2.0)
    x = torch.randn(2, 4, 32)  # FEW_TOKENS: the op's matmul on every build
    with torch.inference_mode():
        assert router._fused_gate(x.reshape(-1, 32)) is not None
        fused = router(x, return_losses=True)
        plain = pytorch_path(router, x, return_losses=True)
        unasked = router(x)
    assert torch.equal(fused.expert_indices, plain.expert_indices)
    assert torch.equal(fused.tokens_per_expert, plain.tokens_per_expert)
    assert torch.equal(fused.num_experts_per_token, plain.num_experts_per_token)
    torch.testing.assert_close(fused.router_logits, plain.router_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.expert_weights, plain.expert_weights, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(fused.aux_loss, plain.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.z_loss, plain.z_loss, rtol=1e-5, atol=1e-6)
    # The losses cost nothing to the answer: a call without them has the same bits.
    assert unasked.aux_loss is None and unasked.z_loss is None
    for name in ("expert_indices", "expert_weights", "router_logits", "tokens_per_expert"):
        assert torch.equal(getattr(unasked, name), getattr(fused, name))


@needs_op
@pytest.mark.parametrize("case", sorted(_SELECTIONS))
def test_the_fused_selection_answers_as_the_pytorch_path(case: str) -> None:
    router = _SELECTIONS[case]()
    assert router._selection_fusable
    router._fusable = False  # the selection op on the batch-invariant matmul's logits
    if case.startswith("zero"):
        with torch.no_grad():  # every biased score negative: zero-filled experts can win
            router.e_score_correction_bias.fill_(-2.0)
    x = torch.randn(3, 7, 32)
    with torch.inference_mode():
        fused = router(x, return_losses=True)
        plain = pytorch_path(router, x, return_losses=True)
    assert torch.equal(fused.expert_indices, plain.expert_indices)
    assert torch.equal(fused.tokens_per_expert, plain.tokens_per_expert)
    assert torch.equal(fused.num_experts_per_token, plain.num_experts_per_token)
    assert torch.equal(fused.router_logits, plain.router_logits)  # the same gate matmul
    torch.testing.assert_close(fused.expert_weights, plain.expert_weights, rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(fused.aux_loss, plain.aux_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.z_loss, plain.z_loss)


@needs_op
@pytest.mark.parametrize("group_score", [GroupScore.MAX, GroupScore.TOP2_SUM])
def test_equal_groups_and_experts_go_to_the_lower_index(group_score: GroupScore) -> None:
    # Four groups of four with the same scores: groups 0 and 1 are kept, and in each
    # the experts' tie (0 == 2, 1 == 3) goes to the lower expert.
    row = torch.tensor([3.0, 2.0, 3.0, 2.0] * 4)
    logits = torch.stack([row, row.flip(0)])
    got = fused_topk.topk_select(
        logits, None, 4, SelectionSpec(sigmoid=True, groups=4, kept_groups=2,
                                       top2_sum=group_score is GroupScore.TOP2_SUM, eps=1e-20))
    assert got.indices.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert got.counts.tolist() == [1] * 8 + [0] * 8


@needs_op
def test_merged_grouped_calls_answer_what_each_call_alone_does(one_row_at_once) -> None:
    """With the op taking calls of at most FEW_TOKENS tokens, the larger calls of a merged
    pass share the merged matmul and the others are op calls of their own."""
    router = grouped_router(scoring=ScoringFunction.SIGMOID, group_score=GroupScore.TOP2_SUM,
                      routed_scaling_factor=2.5)
    calls = [torch.randn(n, 32) for n in (1, 2, 9, 33, 8)]
    wants = [False, True, False, True, True]
    with torch.inference_mode():
        paths = [router._fused_gate(c) is not None for c in calls]
        merged = router.route_many(calls, return_losses=wants)
        alone = [router(c, return_losses=want) for c, want in zip(calls, wants, strict=True)]
    assert paths == [True, True, False, False, True]
    for got, want in zip(merged, alone, strict=True):
        for name in ("expert_indices", "expert_weights", "router_logits", "tokens_per_expert",
                     "aux_loss", "z_loss"):
            assert torch.equal(getattr(got, name), getattr(want, name)) if getattr(
                want, name) is not None else getattr(got, name) is None


@needs_op
def test_a_bias_in_another_dtype_takes_the_pytorch_path() -> None:
    router = _SELECTIONS["deepseek-v3"]()
    x = torch.randn(4, 32)
    with torch.inference_mode():
        want = router(x)
        router.e_score_correction_bias.data = router.e_score_correction_bias.double()
        got = router(x)  # no op error: the PyTorch path casts as it always did
    assert torch.equal(got.expert_indices, want.expert_indices)
