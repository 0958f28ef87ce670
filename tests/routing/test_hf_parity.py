"""Our routers against Hugging Face transformers' own router modules (tiny configs, CPU, fp32).

The references return their top-k unsorted, so we compare the SET of experts per token
and the weights matched by expert id.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2TopkRouter,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3TopkRouter,
)
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moe_router.routing import (
    GroupedTopKRouter,
    GroupScore,
    RouterConfig,
    ScoringFunction,
    TopKRouter,
)

HIDDEN = 32
TOKENS = 96


def _by_expert(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by expert id so unsorted and sorted top-k compare as sets."""
    order = indices.long().argsort(dim=-1)
    return indices.long().gather(-1, order), weights.float().gather(-1, order)


def _assert_same_routing(ours, ref_indices: torch.Tensor, ref_weights: torch.Tensor) -> None:
    k = ref_indices.shape[-1]
    our_idx, our_w = _by_expert(
        ours.expert_indices.reshape(-1, k), ours.expert_weights.reshape(-1, k)
    )
    ref_idx, ref_w = _by_expert(ref_indices.reshape(-1, k), ref_weights.reshape(-1, k))
    torch.testing.assert_close(our_idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(our_w, ref_w, rtol=0, atol=1e-6)


def _random_weight(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen))


def _hidden(seed: int, shape: tuple[int, ...] = (TOKENS, HIDDEN)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _hf_config(model: str, num_experts: int, top_k: int, norm: bool):
    common = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=4)
    if model == "mixtral":
        return transformers.MixtralConfig(
            num_local_experts=num_experts, num_experts_per_tok=top_k, **common
        )
    cls = {
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
    }[model]
    return cls(num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm, **common)


_TOPK_REFERENCES = {
    "mixtral": MixtralTopKRouter,
    "qwen2_moe": Qwen2MoeTopKRouter,
    "qwen3_moe": Qwen3MoeTopKRouter,
    "olmoe": OlmoeTopKRouter,
}


@pytest.mark.parametrize(
    ("model", "num_experts", "top_k", "norm"),
    [
        ("mixtral", 8, 2, True),
        ("qwen2_moe", 60, 4, False),
        ("qwen2_moe", 60, 4, True),
        ("qwen3_moe", 128, 8, True),
        ("qwen3_moe", 128, 8, False),
        ("olmoe", 64, 8, False),
        ("olmoe", 64, 8, True),
    ],
)
def test_topk_router_matches_transformers(model: str, num_experts: int, top_k: int, norm: bool):
    reference = _TOPK_REFERENCES[model](_hf_config(model, num_experts, top_k, norm))
    _random_weight(reference, seed=num_experts + top_k)
    ours = TopKRouter(
        RouterConfig(hidden_size=HIDDEN, num_experts=num_experts, top_k=top_k, renormalize=norm)
    )
    ours.gate.weight.data.copy_(reference.weight.data)
    x = _hidden(seed=7, shape=(3, TOKENS // 3, HIDDEN))
    with torch.no_grad():
        ref_logits, ref_weights, ref_indices = reference(x)
        out = ours(x)
    _assert_same_routing(out, ref_indices, ref_weights)
    torch.testing.assert_close(
        out.router_logits.reshape(-1, num_experts), ref_logits.float(), rtol=1e-5, atol=1e-5
    )


def _deepseek_v3(num_experts: int, top_k: int, n_group: int, topk_group: int):
    config = transformers.DeepseekV3Config(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    reference = DeepseekV3TopkRouter(config)
    ours = GroupedTopKRouter(
        RouterConfig(
            hidden_size=HIDDEN,
            num_experts=num_experts,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            group_score=GroupScore.TOP2_SUM,
            scoring=ScoringFunction.SIGMOID,
            renormalize=True,
            routed_scaling_factor=2.5,
        ),
        use_correction_bias=True,
    )
    return reference, ours


@pytest.mark.parametrize(
    ("num_experts", "top_k", "n_group", "topk_group", "bias_offset"),
    [
        (16, 4, 4, 2, 0.0),
        (256, 8, 8, 4, 0.0),  # DeepSeek-V3's own shape
        # Every biased score negative: transformers 5.x masks dropped groups with -inf
        # as we do (4.x used 0.0; see test_grouped.py), so the two still agree.
        (256, 8, 8, 4, -3.0),
    ],
)
def test_grouped_router_matches_transformers_deepseek_v3(
    num_experts: int, top_k: int, n_group: int, topk_group: int, bias_offset: float
):
    reference, ours = _deepseek_v3(num_experts, top_k, n_group, topk_group)
    _random_weight(reference, seed=num_experts)
    bias = 0.1 * torch.randn(num_experts, generator=torch.Generator().manual_seed(3)) + bias_offset
    reference.e_score_correction_bias.copy_(bias)
    ours.gate.weight.data.copy_(reference.weight.data)
    ours.e_score_correction_bias.copy_(bias)
    x = _hidden(seed=11)
    with torch.no_grad():
        _, ref_weights, ref_indices = reference(x)
        out = ours(x)
    _assert_same_routing(out, ref_indices, ref_weights)


def test_grouped_router_matches_transformers_deepseek_v2():
    config = transformers.DeepseekV2Config(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        n_routed_experts=160,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        topk_method="group_limited_greedy",
        routed_scaling_factor=16.0,
        norm_topk_prob=False,
    )
    reference = DeepseekV2TopkRouter(config)
    _random_weight(reference, seed=160)
    ours = GroupedTopKRouter(
        RouterConfig(
            hidden_size=HIDDEN,
            num_experts=160,
            top_k=6,
            n_group=8,
            topk_group=3,
            group_score=GroupScore.MAX,
            scoring=ScoringFunction.SOFTMAX,
            renormalize=False,
            routed_scaling_factor=16.0,
        )
    )
    ours.gate.weight.data.copy_(reference.weight.data)
    x = _hidden(seed=13)
    with torch.no_grad():
        _, ref_weights, ref_indices = reference(x)
        out = ours(x)
    # Weights are scaled by 16, so the fp32 tolerance scales with them.
    k = 6
    our_idx, our_w = _by_expert(out.expert_indices, out.expert_weights)
    ref_idx, ref_w = _by_expert(ref_indices.reshape(-1, k), ref_weights.reshape(-1, k))
    torch.testing.assert_close(our_idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(our_w, ref_w, rtol=0, atol=16e-6)


def test_deepseek_v2_greedy_is_plain_topk():
    """V2's ``greedy`` method is ungrouped top-k: a TopKRouter without renormalisation."""
    config = transformers.DeepseekV2Config(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        n_routed_experts=64,
        num_experts_per_tok=6,
        topk_method="greedy",
        routed_scaling_factor=1.0,
    )
    reference = DeepseekV2TopkRouter(config)
    _random_weight(reference, seed=64)
    ours = TopKRouter(RouterConfig(hidden_size=HIDDEN, num_experts=64, top_k=6, renormalize=False))
    ours.gate.weight.data.copy_(reference.weight.data)
    x = _hidden(seed=17)
    with torch.no_grad():
        _, ref_weights, ref_indices = reference(x)
        out = ours(x)
    _assert_same_routing(out, ref_indices, ref_weights)


def test_mlp_gate_matches_transformers_zaya_router_layer_0():
    """Zaya's router (no EDA on layer 0): down_proj, RMSNorm, two GELU layers, a skip
    expert and balancing biases on the probabilities = kind moe_router's MLP options."""
    from transformers.models.zaya.modeling_zaya import ZayaRouter

    from moe_router.routing.zeta import MLPLayer, MLPTopKRouter

    hidden, width, experts, k = 32, 16, 16, 1  # Zaya routes one expert per token
    config = transformers.ZayaConfig(hidden_size=hidden, router_hidden_size=width,
                                     num_experts=experts, num_experts_per_tok=k,
                                     num_attention_heads=4, num_key_value_heads=4)
    reference = ZayaRouter(config, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, tensor in reference.named_parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        reference.balancing_biases.copy_(0.05 * torch.randn(experts + 1, generator=gen))
        reference.balancing_biases[-1] = 0.1  # the skip expert wins for some tokens
    ours = MLPTopKRouter(
        RouterConfig(hidden_size=hidden, num_experts=experts, top_k=k, renormalize=False),
        mlp_layers=[MLPLayer(width, activation="none", norm="rms", norm_eps=config.rms_norm_eps),
                    MLPLayer(width, activation="gelu"), MLPLayer(width, activation="gelu")],
        output_bias=False, skip_expert=True, use_correction_bias=True,
    ).eval()
    mlp = reference.router_mlp
    pairs = [(ours.gate.layers[0], reference.down_proj), (ours.gate.layers[1], mlp.fc1),
             (ours.gate.layers[2], mlp.fc2), (ours.gate.layers[3], mlp.out_proj)]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            if theirs.bias is not None:
                mine.bias.copy_(theirs.bias)
        ours.gate.norms[0].weight.copy_(mlp.norm.weight)
        ours.e_score_correction_bias.copy_(reference.balancing_biases)
        x = _hidden(seed=9, shape=(1, TOKENS, hidden))
        _, ref_weights, ref_indices, _ = reference(x)
        out = ours(x[0])
    skipped = ref_weights == 0  # Zaya answers a skip as expert 0 with weight 0
    assert bool(skipped.any()) and bool((~skipped).any())
    ref_indices = ref_indices.masked_fill(skipped, -1)
    got = _by_expert(out.expert_indices, out.expert_weights)
    want = _by_expert(ref_indices, ref_weights)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
