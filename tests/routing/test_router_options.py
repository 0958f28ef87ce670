"""The router options of issue 13, each on numbers worked out by hand, and merged calls.

Gate weights are set so the logits are known exactly (an identity gate: logits = x), so
each expectation below is arithmetic on the printed inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import GroupedTopKRouter, RouterConfig, TopKRouter
from moe_router.routing.hashed import HashRouter
from moe_router.routing.sparsemixer import SparseMixerRouter
from moe_router.routing.zeta import MLPLayer, MLPTopKRouter


def _identity_gate(router: torch.nn.Module, size: int) -> None:
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(size))


def _route(router, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        out = router.eval()(x, **kwargs)
    return out.expert_indices.tolist(), out.expert_weights


def _topk(**options) -> TopKRouter:
    bias = options.pop("use_correction_bias", False)
    config = RouterConfig(hidden_size=4, num_experts=4, **options)
    router = TopKRouter(config, use_correction_bias=bias)
    _identity_gate(router, 4)
    return router


def test_sqrtsoftplus_scores_are_sqrt_of_softplus():
    router = _topk(top_k=2, scoring="sqrtsoftplus", renormalize=False)
    x = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    indices, weights = _route(router, x)
    softplus = [math.log1p(math.exp(v)) for v in (0.0, 1.0, -1.0, 2.0)]
    assert indices == [[3, 1]]
    torch.testing.assert_close(weights, torch.tensor([[softplus[3] ** 0.5, softplus[1] ** 0.5]]))


def test_correction_bias_on_the_logits_steers_selection_only():
    # logits [0.1, 0.2, 0.3, 0.4] + bias [1, 0, 0, -1] = [1.1, 0.2, 0.3, -0.6] -> experts 0, 2
    router = _topk(top_k=2, scoring="sigmoid", renormalize=False, use_correction_bias=True,
                   correction_bias_target="logits")
    router.e_score_correction_bias.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]))
    indices, weights = _route(router, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert indices == [[0, 2]]
    sig = torch.sigmoid(torch.tensor([0.1, 0.3]))  # the weights are the unbiased scores
    torch.testing.assert_close(weights, sig[None])


def test_correction_bias_on_the_scores_and_on_the_logits_choose_differently():
    # scores sigmoid([0, 3, -3, 0.5]) = [.5, .953, .047, .622]; bias [0, -0.5, 0, 0]
    # on scores: [.5, .453, .047, .622] -> {3, 0}; on logits: [0, 2.5, -3, .5] -> {1, 3}
    x = torch.tensor([[0.0, 3.0, -3.0, 0.5]])
    picks = {}
    for target in ("scores", "logits"):
        router = _topk(top_k=2, scoring="sigmoid", use_correction_bias=True,
                       correction_bias_target=target)
        router.e_score_correction_bias.copy_(torch.tensor([0.0, -0.5, 0.0, 0.0]))
        picks[target] = sorted(_route(router, x)[0][0])
    assert picks == {"scores": [0, 3], "logits": [1, 3]}


def test_logit_softcap_and_multiplier_come_before_scoring():
    x = torch.tensor([[10.0, 20.0, -5.0, 0.0]])
    capped = _topk(top_k=1, scoring="sigmoid", renormalize=False, logit_softcap=5.0)
    _, weights = _route(capped, x)
    torch.testing.assert_close(weights, torch.sigmoid(torch.tanh(torch.tensor([[4.0]])) * 5.0))
    scaled = _topk(top_k=1, scoring="sigmoid", renormalize=False, logit_multiplier=0.25)
    _, weights = _route(scaled, x)
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[5.0]])))


def test_renormalize_eps_is_in_the_denominator():
    router = _topk(top_k=2, scoring="sigmoid", renormalize_eps=0.5)
    x = torch.zeros(1, 4)  # every score 0.5; the top two sum to 1
    _, weights = _route(router, x)
    torch.testing.assert_close(weights, torch.tensor([[0.5 / 1.5, 0.5 / 1.5]]))


def test_rms_input_norm_and_per_expert_scale_as_gemma_4():
    config = RouterConfig(hidden_size=4, num_experts=4, top_k=2, input_norm="rms",
                          input_norm_eps=1e-6, per_expert_scale=True)
    router = TopKRouter(config)
    _identity_gate(router, 4)
    with torch.no_grad():
        router.input_scale.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
        router.per_expert_scale.copy_(torch.tensor([1.0, 3.0, 1.0, 0.5]))
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0]])  # rms 2: normed [1, 1, 1, 1], then / sqrt(4)
    indices, weights = _route(router, x)
    # logits [0.5, 1.0, 0.5, 0.5]*(1+1e-6)^-1/2; top 2: expert 1, then expert 0 (lower index)
    logits = torch.tensor([0.5, 1.0, 0.5, 0.5]) * (1 + 1e-6) ** -0.5
    probs = torch.softmax(logits, -1)
    pair = torch.stack([probs[1], probs[0]]) / (probs[1] + probs[0])
    assert indices == [[1, 0]]
    torch.testing.assert_close(weights, (pair * torch.tensor([3.0, 1.0]))[None])


def test_bf16_input_norm_is_rounded_to_bf16_before_the_scale():
    config = RouterConfig(hidden_size=4, num_experts=4, top_k=1, input_norm="rms")
    router = TopKRouter(config)
    x = torch.tensor([[0.3, 1.7, -2.9, 0.1]]).bfloat16().float()  # the values bf16 holds
    normed = x * (x.pow(2).mean() + 1e-6) ** -0.5
    with torch.no_grad():
        logits16 = router.compute_router_logits(x.bfloat16())
    expected = torch.nn.functional.linear(normed.bfloat16().float() * 0.5,
                                          router.gate.weight)
    torch.testing.assert_close(logits16, expected)


def test_scored_shared_experts_join_the_normalisation():
    # E = 4 of which the last 1 is shared; sigmoid scores of logits [2, 0, 1, 0] (shared 0)
    config = RouterConfig(hidden_size=4, num_experts=4, top_k=2, scoring="sigmoid",
                          scored_shared_experts=1, routed_scaling_factor=2.0,
                          learned_weight_scale=True)
    router = TopKRouter(config)
    _identity_gate(router, 4)
    with torch.no_grad():
        router.weight_scale.fill_(0.5)
    indices, weights = _route(router, torch.tensor([[2.0, 0.0, 1.0, 0.0]]))
    s = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0]))
    assert indices == [[0, 2, 3]]  # k routed, then the shared one
    torch.testing.assert_close(weights, (s / s.sum())[None] * 2.0 * 0.5)
    assert router.k_range == (3, 3)


def test_group_mask_fill_zero_lets_a_dropped_group_win_over_negative_scores():
    # 4 experts in 2 groups; sigmoid scores of logits [0, 0, 3, 3] plus bias -2:
    # choice [-1.5, -1.5, -1.05, -1.05]; group max keeps group 1 only; fill zero masks
    # group 0 with 0.0 > -1.05, so both of its experts are chosen (k = 2)
    x = torch.tensor([[0.0, 0.0, 3.0, 3.0]])
    chosen = {}
    for fill in ("neg_inf", "zero"):
        config = RouterConfig(hidden_size=4, num_experts=4, top_k=2, scoring="sigmoid",
                              n_group=2, topk_group=1, group_mask_fill=fill)
        router = GroupedTopKRouter(config, use_correction_bias=True)
        _identity_gate(router, 4)
        router.e_score_correction_bias.fill_(-2.0)
        chosen[fill] = sorted(_route(router, x)[0][0])
    assert chosen == {"neg_inf": [2, 3], "zero": [0, 1]}


def test_sparsemixer_weights_by_hand():
    # logits [2, 1.99, 0, -1], eps 0.01: the first mask keeps x with (2 - x)/max(|x|, 2)
    # <= 0.02: 2 and 1.99 -> w1 = softmax([2, 1.99])[0]; then 1.99 is the max of the rest
    # and (1.99 - x)/max(|x|, 1.99) <= 0.02 keeps 2? no, 2 is removed; keeps 1.99 alone.
    router = SparseMixerRouter(RouterConfig(hidden_size=4, num_experts=4, top_k=2),
                               sparsemixer_eps=0.01)
    _identity_gate(router, 4)
    indices, weights = _route(router, torch.tensor([[2.0, 1.99, 0.0, -1.0]]))
    assert indices == [[0, 1]]
    w1 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.99))
    torch.testing.assert_close(weights, torch.tensor([[w1, 1.0]]))


def test_sparsemixer_needs_two_experts():
    with pytest.raises(RouterConfigurationError, match="top_k: SparseMixer chooses exactly 2"):
        SparseMixerRouter(RouterConfig(hidden_size=4, num_experts=4, top_k=3))


def test_hash_router_takes_the_table_and_weights_by_the_gate():
    router = HashRouter(RouterConfig(hidden_size=4, num_experts=4, top_k=2, scoring="sigmoid",
                                     routed_scaling_factor=3.0), vocab_size=5)
    _identity_gate(router, 4)
    router.token_experts.copy_(torch.tensor([[0, 1], [2, 3], [3, 0], [1, 2], [0, 3]]))
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    indices, weights = _route(router, x, input_ids=torch.tensor([2, 1]))
    assert indices == [[3, 0], [2, 3]]
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights[0], s / s.sum() * 3.0)
    torch.testing.assert_close(weights[1], torch.tensor([1.5, 1.5]))


@pytest.mark.parametrize(("input_ids", "match"), [
    (None, r"input_ids: router routes by token id and needs input_ids, an INT32 or INT64 "
           r"tensor of shape \[2\]"),
    (torch.tensor([1, 2, 3]), r"input_ids: must be .* got shape \[3\]"),
    (torch.tensor([1.0, 2.0]), r"input_ids: must be .* got dtype torch.float32"),
    (torch.tensor([1, 5]), r"input_ids: token ids must be in \[0, 5\)"),
])
def test_hash_router_names_input_ids_when_they_are_wrong(input_ids, match):
    router = HashRouter(RouterConfig(hidden_size=4, num_experts=4, top_k=2), vocab_size=5)
    with pytest.raises(ValidationError, match=match):
        router(torch.zeros(2, 4), input_ids=input_ids)


def test_mlp_gate_with_norm_activation_skip_expert_and_bias():
    # one hidden layer: identity Linear, no activation, rms norm; output identity + skip row
    config = RouterConfig(hidden_size=2, num_experts=2, top_k=2, renormalize=False)
    router = MLPTopKRouter(config, mlp_layers=[MLPLayer(2, activation="none", norm="rms")],
                           output_bias=False, skip_expert=True, use_correction_bias=True)
    with torch.no_grad():
        router.gate.layers[0].weight.copy_(torch.eye(2))
        router.gate.layers[0].bias.zero_()
        router.gate.layers[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt(12.5): normed [0.8485, 1.1314]
    with torch.no_grad():
        out = router.eval()(x)
    normed = x / (x.pow(2).mean() + 1e-6) ** 0.5
    probs = torch.softmax(torch.cat([normed[0], torch.zeros(1)]), -1)
    # choice = probs + [0, 0, 1]: skip first (id 2), then expert 1; the skip slot is padding
    assert out.expert_indices.tolist() == [[1, -1]]
    assert out.num_experts_per_token.tolist() == [1]
    torch.testing.assert_close(out.expert_weights, torch.tensor([[float(probs[1]), 0.0]]))
    assert out.router_logits.shape == (1, 3) and router.k_range == (1, 2)


@pytest.mark.parametrize("options", [
    dict(scoring="sqrtsoftplus", use_correction_bias=True),
    dict(scoring="sigmoid", use_correction_bias=True, correction_bias_target="logits"),
    dict(logit_softcap=2.0, logit_multiplier=0.7, input_norm="rms", per_expert_scale=True),
    dict(scoring="sigmoid", scored_shared_experts=2, learned_weight_scale=True),
])
def test_merged_calls_answer_as_each_alone(options):
    bias = options.pop("use_correction_bias", False)
    config = RouterConfig(hidden_size=16, num_experts=8, top_k=2, **options)
    router = TopKRouter(config, use_correction_bias=bias).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, tensor in router.named_parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen))
        if bias:
            router.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.1)
        calls = [torch.randn(n, 16, generator=gen) for n in (1, 5, 3, 17)]
        merged = router.route_many(calls)
        for call, answer in zip(calls, merged, strict=True):
            alone = router(call)
            assert torch.equal(answer.expert_indices, alone.expert_indices)
            assert torch.equal(answer.expert_weights, alone.expert_weights)


@pytest.mark.parametrize(("options", "match"), [
    (dict(scored_shared_experts=1), "scored_shared_experts: needs per-expert scores"),
    (dict(scoring="sigmoid", scored_shared_experts=1, renormalize=False),
     "scored_shared_experts: only changes the normalisation"),
    (dict(scoring="sigmoid", scored_shared_experts=3), "leaves 1 routed experts"),
    (dict(logit_softcap=0.0), "logit_softcap: must be a finite number > 0"),
    (dict(logit_multiplier=-1.0), "logit_multiplier: must be a finite number > 0"),
    (dict(renormalize_eps=1.0), r"renormalize_eps: must be in \[0, 1\)"),
    (dict(input_norm="layer"), "input_norm: must be one of 'none', 'rms'"),
    (dict(group_mask_fill="nan"), "group_mask_fill: must be one of 'neg_inf', 'zero'"),
])
def test_router_config_refuses_options_that_do_not_combine(options, match):
    with pytest.raises(RouterConfigurationError, match=match):
        RouterConfig(hidden_size=4, num_experts=4, top_k=2, **options)


def test_a_bias_on_the_logits_needs_the_bias():
    with pytest.raises(RouterConfigurationError, match="correction_bias_target: 'logits' "
                       "places the e_score_correction_bias; it needs use_correction_bias"):
        TopKRouter(RouterConfig(hidden_size=4, num_experts=4, correction_bias_target="logits"))
