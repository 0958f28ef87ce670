"""GroupedTopKRouter (DeepSeek-V2/V3 group-limited routing): hand cases, a per-token reference."""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import GroupedTopKRouter, GroupScore, RouterConfig, ScoringFunction
from moe_router.routing import functional as F


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _identity_router(num_experts: int, use_correction_bias: bool = False, **config):
    """Gate = identity, so the hidden state is the logits."""
    router = GroupedTopKRouter(
        RouterConfig(hidden_size=num_experts, num_experts=num_experts, **config),
        use_correction_bias=use_correction_bias,
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def _v3_config(num_experts: int = 256, hidden: int = 32, **extra) -> RouterConfig:
    return RouterConfig(
        hidden_size=hidden,
        num_experts=num_experts,
        top_k=8,
        n_group=8,
        topk_group=4,
        group_score=GroupScore.TOP2_SUM,
        scoring=ScoringFunction.SIGMOID,
        renormalize=True,
        routed_scaling_factor=2.5,
        **extra,
    )


def _v2_config(hidden: int = 32) -> RouterConfig:
    return RouterConfig(
        hidden_size=hidden,
        num_experts=160,
        top_k=6,
        n_group=8,
        topk_group=3,
        group_score=GroupScore.MAX,
        scoring=ScoringFunction.SOFTMAX,
        renormalize=False,
        routed_scaling_factor=16.0,
    )


# ----------------------------------------------------------------- hand cases
def test_max_group_score_limits_experts_to_kept_groups():
    # Groups {0,1} {2,3} {4,5} {6,7}; group maxima 5, 0, 4.8, 4.7 -> keep groups 0 and 2.
    router = _identity_router(8, top_k=3, n_group=4, topk_group=2, renormalize=False)
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0, 4.8, 0.0, 4.7, 1.0]])
    out = router(logits)
    # Expert 6 (4.7) beats expert 5 (0.0) overall, but its group was dropped.
    assert out.expert_indices.tolist() == [[0, 1, 4]]
    torch.testing.assert_close(out.expert_weights, torch.softmax(logits, -1)[:, [0, 1, 4]])


def test_top2_sum_and_max_keep_different_groups():
    # Groups of 4: group 0 = [3, -3, -3, -3], group 1 = [2, 2, -3, -3]; one group kept.
    logits = torch.tensor([[3.0, -3.0, -3.0, -3.0, 2.0, 2.0, -3.0, -3.0]])
    common = dict(
        top_k=2, n_group=2, topk_group=1, scoring=ScoringFunction.SIGMOID, routed_scaling_factor=2.5
    )
    by_max = _identity_router(8, group_score=GroupScore.MAX, **common)(logits)
    # max: group 0 (sigma(3) > sigma(2)); inside it 3 then a tie of -3s -> lower index 1.
    assert by_max.expert_indices.tolist() == [[0, 1]]
    top2 = _identity_router(8, group_score=GroupScore.TOP2_SUM, **common)(logits)
    # top-2 sum: group 0 = sigma(3)+sigma(-3) = 1.0 < group 1 = 2 sigma(2) = 1.76
    assert top2.expert_indices.tolist() == [[4, 5]]
    torch.testing.assert_close(top2.expert_weights, torch.tensor([[1.25, 1.25]]))


def test_correction_bias_steers_selection_but_not_weights():
    router = _identity_router(
        4, use_correction_bias=True, top_k=1, scoring=ScoringFunction.SIGMOID, renormalize=False
    )
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    out = router(torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    # biased scores: [sigma(2)=.88, .5, .5, 1.5] -> expert 3; weight = unbiased sigma(0)
    assert out.expert_indices.tolist() == [[3]]
    torch.testing.assert_close(out.expert_weights, torch.tensor([[0.5]]))


def test_correction_bias_buffer_exists_only_when_asked():
    with_bias = GroupedTopKRouter(_v3_config(), use_correction_bias=True)
    assert with_bias.e_score_correction_bias.dtype == torch.float32
    assert with_bias.e_score_correction_bias.tolist() == [0.0] * 256
    assert "e_score_correction_bias" in with_bias.state_dict()
    without = GroupedTopKRouter(_v3_config())
    assert not hasattr(without, "e_score_correction_bias")
    assert "e_score_correction_bias" not in without.state_dict()


def _zero_fill_selection(choice: torch.Tensor, n_group: int, topk_group: int, top_k: int):
    """transformers 4.x's DeepseekV3TopkRouter rule: dropped groups filled with 0.0."""
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, n_group, experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    kept = torch.zeros(tokens, n_group, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    mask = kept.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    return choice.masked_fill(~mask, 0.0).topk(top_k, dim=-1).indices, mask


def test_negative_biased_scores_never_pick_a_dropped_group():
    """With every biased score negative, a 0.0 fill makes dropped experts win; -inf does not."""
    num_experts, n_group, topk_group, top_k = 16, 4, 2, 4
    router = GroupedTopKRouter(
        RouterConfig(
            hidden_size=8,
            num_experts=num_experts,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            group_score=GroupScore.TOP2_SUM,
            scoring=ScoringFunction.SIGMOID,
        ),
        use_correction_bias=True,
    )
    router.e_score_correction_bias.fill_(-2.0)  # sigmoid in (0, 1) -> biased in (-2, -1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    out = router(x)
    choice = torch.sigmoid(out.router_logits) - 2.0
    zero_fill, kept_mask = _zero_fill_selection(choice, n_group, topk_group, top_k)
    ours_kept = kept_mask.gather(1, out.expert_indices.long())
    assert bool(ours_kept.all()), "an expert of a dropped group was chosen"
    zero_fill_kept = kept_mask.gather(1, zero_fill)
    assert not bool(zero_fill_kept.all()), "the 0.0 rule should pick dropped experts here"
    # Ours is exactly the top-k of the kept experts' biased scores.
    expected = F.topk_lowest_index(choice.masked_fill(~kept_mask, float("-inf")), top_k)[1]
    assert out.expert_indices.long().tolist() == expected.tolist()


# ----------------------------------------------------------------- DeepSeek shapes
def _reference_row(scores, bias, n_group, topk_group, top_k, top2, renorm, scale):
    """Plain-Python group-limited routing of one token (sorted() with index tie-break)."""
    choice = [s + b for s, b in zip(scores, bias, strict=True)]
    size = len(scores) // n_group
    group_values = []
    for g in range(n_group):
        members = sorted(choice[g * size : (g + 1) * size], reverse=True)
        group_values.append(members[0] + members[1] if top2 else members[0])
    kept = sorted(range(n_group), key=lambda g: (-group_values[g], g))[:topk_group]
    candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda e: (-choice[e], e))[:top_k]
    weights = [scores[e] for e in chosen]
    if renorm:
        total = sum(weights) + 1e-20
        weights = [w / total for w in weights]
    return chosen, [w * scale for w in weights]


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_deepseek_shapes_match_a_per_token_reference(version: str):
    config = _v3_config() if version == "v3" else _v2_config()
    router = GroupedTopKRouter(config, use_correction_bias=version == "v3")
    gen = torch.Generator().manual_seed(42)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(router.gate.weight.shape, generator=gen))
        if version == "v3":
            router.e_score_correction_bias.copy_(0.05 * torch.randn(256, generator=gen))
    x = torch.randn(24, 32, generator=gen)
    out = router(x)
    scores = F.score(out.router_logits, config.scoring)
    bias = router.e_score_correction_bias.tolist() if version == "v3" else [0.0] * 160
    for t in range(x.shape[0]):
        chosen, weights = _reference_row(
            scores[t].tolist(),
            bias,
            config.n_group,
            config.topk_group,
            config.top_k,
            config.group_score is GroupScore.TOP2_SUM,
            config.renormalize,
            config.routed_scaling_factor,
        )
        assert out.expert_indices[t].tolist() == chosen
        torch.testing.assert_close(
            out.expert_weights[t], torch.tensor(weights), rtol=1e-5, atol=1e-6
        )
    assert out.num_experts_per_token.tolist() == [config.top_k] * 24
    if version == "v3":
        torch.testing.assert_close(out.expert_weights.sum(-1), torch.full((24,), 2.5))


def test_sigmoid_aux_loss_uses_normalised_scores_and_megatrons_plain_top_k():
    """Megatron's aux loss counts a plain top-k of the normalised sigmoid scores over
    all experts (no groups, no bias); ``selected`` counts the grouped choice instead."""
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    router = GroupedTopKRouter(_v3_config(num_experts=32), use_correction_bias=True)
    out = router(x)
    probs = F.renormalize(torch.sigmoid(out.router_logits))
    plain = F.topk_lowest_index(probs, 8)[1]
    assert not torch.equal(plain.sort(-1).values, out.expert_indices.long().sort(-1).values)
    torch.testing.assert_close(out.aux_loss, F.compute_aux_loss(probs, plain, 8))
    selected = GroupedTopKRouter(
        _v3_config(num_experts=32, aux_loss_assignments="selected"), use_correction_bias=True
    )
    selected.load_state_dict(router.state_dict())
    torch.testing.assert_close(
        selected(x).aux_loss, F.compute_aux_loss(probs, out.expert_indices.long(), 8)
    )


def test_single_group_is_plain_topk():
    router = GroupedTopKRouter(RouterConfig(hidden_size=8, num_experts=8, top_k=2))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    out = router(x)
    expected_w, expected_i = F.topk_lowest_index(torch.softmax(out.router_logits, -1), 2)
    assert out.expert_indices.long().tolist() == expected_i.tolist()
    torch.testing.assert_close(out.expert_weights, F.renormalize(expected_w))


# ----------------------------------------------------------------- arguments
def test_rejects_non_bool_use_correction_bias():
    with pytest.raises(RouterConfigurationError, match="use_correction_bias"):
        GroupedTopKRouter(_v3_config(), use_correction_bias="yes")  # type: ignore[arg-type]


def test_rejects_top2_sum_with_single_expert_groups():
    config = RouterConfig(
        hidden_size=4, num_experts=4, top_k=1, n_group=4, topk_group=2, group_score="top2_sum"
    )
    with pytest.raises(RouterConfigurationError, match="group_score"):
        GroupedTopKRouter(config)


def test_rejects_top_k_larger_than_the_kept_experts():
    config = RouterConfig(hidden_size=4, num_experts=16, top_k=5, n_group=4, topk_group=1)
    with pytest.raises(RouterConfigurationError, match="top_k.*topk_group"):
        GroupedTopKRouter(config)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        (dict(n_group=3), "n_group"),
        (dict(n_group=4, topk_group=5), "topk_group"),
        (dict(n_group=0), "n_group"),
        (dict(group_score="top3"), "group_score"),
    ],
)
def test_group_fields_of_router_config_are_checked(fields: dict, name: str):
    with pytest.raises(RouterConfigurationError, match=name):
        RouterConfig(hidden_size=4, num_experts=16, top_k=1, **fields)
