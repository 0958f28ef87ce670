"""FLOPProfiler and ComparisonProfiler: FLOPs of known shapes by hand, reports, errors."""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.analysis.profilers import (
    ComparisonProfiler,
    FLOPProfiler,
    build_router_from_dict,
)
from moe_router.errors import ProfilingError
from moe_router.routing import MLPTopKRouter, RouterConfig, TopKRouter
from moe_router.routing.dynamic import DynamicRouter


def topk(dim=8, experts=4, k=2, **config) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(RouterConfig(hidden_size=dim, num_experts=experts, top_k=k, **config))


def tokens(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def test_flops_of_known_shape_by_hand():
    # T = 2*3 = 6, D = 8, E = 4, k = 2, softmax, no gate bias, A = 12 assignments:
    # gate 2*6*8*4 = 384; scoring 5*6*4 = 120; selection 6*4*ceil(log2 2) = 24;
    # normalization 2*12 = 24; routing 552.
    # experts (D_ff 16, 2 matmuls): 2*2*12*8*16 = 6144 = static; combine 2*12*8 = 192.
    p = FLOPProfiler(num_runs=2).profile_routing(topk(), tokens(2, 3, 8), expert_ffn_dim=16)
    assert (p["num_tokens"], p["assignments"]) == (6, 12)
    assert p["gate_flops"] == 384 and p["scoring_flops"] == 120
    assert p["selection_flops"] == 24 and p["normalization_flops"] == 24
    assert p["routing_flops"] == 552
    assert p["expert_flops"] == 6144 and p["static_expert_flops"] == 6144
    assert p["combine_flops"] == 192 and p["total_flops"] == 552 + 6144 + 192
    assert p["expert_flops_saved_fraction"] == 0.0
    assert math.isfinite(p["time_ms"]) and p["time_ms"] > 0
    assert p["achieved_flops_per_s"] == pytest.approx(552 / (p["time_ms"] / 1e3))


def test_flops_sigmoid_bias_and_wider_k():
    # T = 5, D = 8, E = 8, k = 3, sigmoid, gate bias: gate 2*5*8*8 + 5*8 = 680;
    # scoring 4*5*8 = 160; selection 5*8*ceil(log2 3) = 80; normalization 2*15 = 30.
    router = topk(experts=8, k=3, scoring="sigmoid", gate_bias=True)
    p = FLOPProfiler(num_runs=1, warmup_runs=0).profile_routing(router, tokens(5, 8))
    assert p["gate_flops"] == 680 and p["scoring_flops"] == 160
    assert p["selection_flops"] == 80 and p["normalization_flops"] == 30
    assert "expert_flops" not in p


def test_mlp_router_counts_every_linear_layer():
    # MoERouter 8 -> 32 -> 4 with biases, T = 6:
    # 2*6*8*32 + 6*32 + 2*6*32*4 + 6*4 = 3072 + 192 + 1536 + 24 = 4824.
    torch.manual_seed(0)
    router = MLPTopKRouter(RouterConfig(hidden_size=8, num_experts=4, top_k=2),
                           hidden_layers=[32])
    p = FLOPProfiler(num_runs=1).profile_routing(router, tokens(6, 8))
    assert p["gate_flops"] == 4824


def test_variable_k_saves_expert_flops():
    # Capacity ceil(12*2/4*0.5) = 3 per expert: at most 12 of the 24 assignments survive.
    router = topk(capacity_factor=0.5)
    p = FLOPProfiler(expert_ffn_dim=16, num_runs=1).profile_routing(router, tokens(12, 8))
    a = p["assignments"]
    assert a <= 12 and p["min_experts_per_token"] < p["max_experts_per_token"]
    assert p["expert_flops"] == 2 * 2 * a * 8 * 16
    assert p["static_expert_flops"] == 2 * 2 * 12 * 2 * 8 * 16
    assert p["expert_flops_saved_fraction"] == pytest.approx(1 - a / 24)
    assert p["normalization_flops"] == 2 * a


def test_summary_totals():
    prof = FLOPProfiler(num_runs=1)
    empty = prof.get_summary()
    assert empty["num_profiles"] == 0 and empty["total_routing_flops"] == 0
    a = prof.profile_routing(topk(), tokens(6, 8))
    b = prof.profile_routing(topk(k=1), tokens(4, 8))
    s = prof.get_summary()
    assert s["num_profiles"] == 2 and s["total_tokens"] == 10
    assert s["total_routing_flops"] == a["routing_flops"] + b["routing_flops"]
    assert s["avg_experts_per_token"] == pytest.approx((12 + 4) / 10)
    assert s["total_time_ms"] == pytest.approx(a["time_ms"] + b["time_ms"])
    prof.reset()
    assert prof.get_summary()["num_profiles"] == 0


@pytest.mark.parametrize(
    ("router", "data", "match"),
    [
        (torch.nn.Linear(8, 4), tokens(4, 8), "router"),
        (None, tokens(4, 7), "hidden_states"),
        (None, torch.ones(4, 8, dtype=torch.int64), "hidden_states"),
        (None, tokens(8), "hidden_states"),
    ],
)
def test_profile_bad_inputs(router, data, match):
    with pytest.raises(ProfilingError, match=match):
        FLOPProfiler().profile_routing(router or topk(), data)


def test_profiler_bad_arguments():
    with pytest.raises(ProfilingError, match="expert_ffn_dim"):
        FLOPProfiler(expert_ffn_dim=0)
    with pytest.raises(ProfilingError, match="num_runs"):
        FLOPProfiler(num_runs=0)


def test_compare_static_and_dynamic_side_by_side():
    data = tokens(4, 8, 16)
    dynamic = DynamicRouter(input_dim=16, num_experts=8, min_experts=1, max_experts=4)
    prof = ComparisonProfiler(expert_ffn_dim=32, num_runs=2)
    results = prof.compare_routing_strategies(
        [{"name": "static-top4", "kind": "top_k", "num_experts": 8, "top_k": 4},
         {"name": "dynamic", "kind": "dynamic", "num_experts": 8, "min_experts": 1,
          "max_experts": 4},
         dynamic],
        data,
    )
    assert list(results) == ["static-top4", "dynamic", "2:DynamicRouter"]
    static, dyn = results["static-top4"], results["dynamic"]
    assert static["avg_experts_per_token"] == 4.0 and static["expert_flops_saved_fraction"] == 0
    assert dyn["k_range"] == (1, 4) and dyn["router"] == "DynamicRouter"
    assert 1.0 <= dyn["avg_experts_per_token"] <= 4.0
    assert dyn["expert_flops_saved_fraction"] == pytest.approx(
        1 - dyn["avg_experts_per_token"] / 4)
    assert dyn["assignments_vs_first"] == pytest.approx(dyn["assignments"] / 128)
    assert dyn["expert_flops"] == 2 * 2 * dyn["assignments"] * 16 * 32
    for r in results.values():
        assert 0 < r["load_balance_score"] <= 1 and r["latency_p50_ms"] > 0
    report = prof.generate_comparison_report()
    assert report.startswith("# Routing strategy comparison")
    assert "| static-top4 | TopKRouter | 4-4 | 4.000 (4-4) | 0.0% | 1.000x |" in report
    assert sum(line.startswith("| ") for line in report.splitlines()) == 1 + 3


def test_build_router_from_dict_kinds():
    router = build_router_from_dict({"kind": "soft_moe", "num_experts": 4,
                                     "slots_per_expert": 2}, hidden_dim=8)
    assert type(router).__name__ == "SoftMoERouter"
    with pytest.raises(ProfilingError, match="kind"):
        build_router_from_dict({"kind": "magic", "num_experts": 4}, 8)
    with pytest.raises(ProfilingError, match="top_k"):
        build_router_from_dict({"kind": "top_k", "num_experts": 4, "top_k": 9}, 8)
    with pytest.raises(ProfilingError, match="bogus"):
        build_router_from_dict({"kind": "top_k", "num_experts": 4, "bogus": 1}, 8)


def test_comparison_bad_inputs():
    prof = ComparisonProfiler(num_runs=1)
    with pytest.raises(ProfilingError, match="no comparison"):
        prof.generate_comparison_report()
    with pytest.raises(ProfilingError, match="test_data"):
        prof.compare_routing_strategies([topk()], [[1.0]])
    with pytest.raises(ProfilingError, match="configs"):
        prof.compare_routing_strategies([], tokens(4, 8))
    with pytest.raises(ProfilingError, match="unique"):
        prof.compare_routing_strategies(
            [{"name": "a", "num_experts": 4}, {"name": "a", "num_experts": 4}], tokens(4, 8))
    with pytest.raises(ProfilingError, match=r"configs\[0\]"):
        prof.compare_routing_strategies(["top_k"], tokens(4, 8))
