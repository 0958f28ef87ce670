"""RoutingSimulator: sampling, load-balance metrics and hand-checked communication cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.analysis import RoutingSimulator, load_balance_metrics, plan_placement
from moe_router.errors import ValidationError
from moe_router.routing import RouterConfig, TopKRouter


def test_uniform_shape_distinct_and_reproducible():
    sim = RoutingSimulator(num_experts=8, num_tokens=500, top_k=3, seed=5)
    routing = sim.simulate_uniform()
    assert routing.shape == (500, 3) and routing.dtype == torch.int64
    assert int(routing.min()) >= 0 and int(routing.max()) < 8
    assert all(len(set(row)) == 3 for row in routing.tolist())
    again = RoutingSimulator(8, 500, 3, seed=5).simulate_uniform()
    torch.testing.assert_close(routing, again)
    assert not torch.equal(routing, RoutingSimulator(8, 500, 3, seed=6).simulate_uniform())


def test_skewed_first_choice_follows_zipf():
    # The first slot of Gumbel-top-k is one draw from p, p_i ∝ 1/(i+1)^1.
    sim = RoutingSimulator(num_experts=6, num_tokens=40_000, top_k=2, seed=1)
    routing = sim.simulate_skewed(1.0)
    p = torch.tensor([1 / (i + 1) for i in range(6)], dtype=torch.float64)
    p /= p.sum()
    torch.testing.assert_close(sim.expert_popularity(1.0), p)
    freq = torch.bincount(routing[:, 0], minlength=6).double() / 40_000
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert (routing[:, 0] != routing[:, 1]).all()


def test_skew_increases_imbalance_and_zero_is_uniform():
    sim = RoutingSimulator(num_experts=8, num_tokens=4000, top_k=2, seed=2)
    torch.testing.assert_close(sim.expert_popularity(0.0), torch.full((8,), 1 / 8,
                                                                      dtype=torch.float64))
    cvs = [sim.analyze_load_balance(sim.simulate_skewed(s))["coefficient_of_variation"]
           for s in (0.0, 0.5, 1.0, 2.0)]
    assert cvs == sorted(cvs) and cvs[0] < 0.1 and cvs[-1] > 0.5


def test_top_k_equal_to_num_experts_is_a_permutation():
    routing = RoutingSimulator(5, 50, 5).simulate_skewed(1.5)
    torch.testing.assert_close(routing.sort(dim=1).values, torch.arange(5).expand(50, 5))


def test_load_balance_hand_case_from_every_input_form():
    # counts [3, 1, 0, 0]: mean 1, population std sqrt(6/4), Jain 16 / (4 * 10) = 0.4,
    # entropy -(0.75 ln 0.75 + 0.25 ln 0.25).
    sim = RoutingSimulator(num_experts=4, num_tokens=3, top_k=2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    forms = [
        torch.tensor([[0, 1], [0, -1], [0, -1]], dtype=torch.int32),
        np.array([[0, 1], [0, -1], [0, -1]]),
        [[0, 1], [0, -1], [0, -1]],
        [3, 1, 0, 0],
        torch.tensor([3, 1, 0, 0]),
    ]
    for form in forms:
        m = sim.analyze_load_balance(form)
        assert m["tokens_per_expert"] == [3, 1, 0, 0]
        assert m["total_assignments"] == 4
        assert m["coefficient_of_variation"] == pytest.approx(math.sqrt(1.5))
        assert m["max_mean_ratio"] == pytest.approx(3.0)
        assert m["entropy"] == pytest.approx(entropy)
        assert m["normalized_entropy"] == pytest.approx(entropy / math.log(4))
        assert m["load_balance_score"] == pytest.approx(0.4)
        assert m["idle_experts"] == 2


def test_load_balance_from_router_output():
    torch.manual_seed(0)
    router = TopKRouter(RouterConfig(hidden_size=8, num_experts=4, top_k=2))
    out = router(torch.randn(10, 8))
    m = RoutingSimulator(4, 10, 2).analyze_load_balance(out)
    assert m["tokens_per_expert"] == out.tokens_per_expert.tolist()
    assert m["total_assignments"] == 20


def test_empty_load_reads_balanced():
    m = load_balance_metrics(torch.zeros(4, dtype=torch.int64))
    assert m["coefficient_of_variation"] == 0.0 and m["load_balance_score"] == 1.0
    assert m["normalized_entropy"] == pytest.approx(1.0)


def test_communication_hand_case():
    # 4 experts, 2 devices: experts {0,1} on d0, {2,3} on d1; tokens {0,1} on d0, {2,3} on d1.
    # t0 -> 0,1: local.          t1 -> 0,2: expert 2 remote -> one transfer d0->d1.
    # t2 -> 0,1: both on d0 -> ONE transfer d1->d0 (de-duplicated), two remote assignments.
    # t3 -> 3,1: expert 1 remote -> one transfer d1->d0.
    # transfers 3, bytes = 3 * hidden 8 * 2 bytes = 48 each way.
    sim = RoutingSimulator(num_experts=4, num_tokens=4, top_k=2)
    routing = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    cost = sim.estimate_communication_cost(routing, num_devices=2, hidden_dim=8, dtype_bytes=2)
    assert cost["traffic_matrix_tokens"] == [[0, 1], [2, 0]]
    assert cost["token_transfers"] == 3
    assert cost["remote_assignments"] == 4 and cost["local_assignments"] == 4
    assert cost["dispatch_bytes"] == 48 and cost["combine_bytes"] == 48
    assert cost["total_bytes"] == 96
    assert cost["dispatch_send_bytes"] == [16, 32]
    assert cost["dispatch_recv_bytes"] == [32, 16]
    assert cost["combine_send_bytes"] == [32, 16]
    assert cost["combine_recv_bytes"] == [16, 32]


def test_communication_explicit_placement_and_replicas():
    sim = RoutingSimulator(num_experts=4, num_tokens=4, top_k=2)
    routing = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    # Swapped placement: {2,3} on d0, {0,1} on d1. t0 -> d1; t1 -> d1 (expert 0);
    # t2 local; t3 -> d0 (expert 3). 3 transfers: [[0, 2], [1, 0]].
    cost = sim.estimate_communication_cost(routing, 2, hidden_dim=8, placement=[1, 1, 0, 0])
    assert cost["traffic_matrix_tokens"] == [[0, 2], [1, 0]]
    # Replicas of experts 0 and 1 on both devices: every assignment is served locally.
    plan = plan_placement([6, 2, 2, 2], num_devices=2, redundant_slots=1)
    cost = sim.estimate_communication_cost(routing, 2, hidden_dim=8, placement=plan)
    assert cost["token_transfers"] == 0 and cost["total_bytes"] == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), devices=st.integers(1, 8), skew=st.floats(0, 2))
def test_communication_properties(seed, devices, skew):
    sim = RoutingSimulator(num_experts=8, num_tokens=37, top_k=3, seed=seed)
    cost = sim.estimate_communication_cost(sim.simulate_skewed(skew), devices, hidden_dim=4)
    assert cost["token_transfers"] <= cost["remote_assignments"]
    assert cost["token_transfers"] <= 37 * min(3, devices - 1)
    assert sum(cost["dispatch_send_bytes"]) == sum(cost["dispatch_recv_bytes"])
    assert sum(cost["dispatch_send_bytes"]) == cost["dispatch_bytes"]
    if devices == 1:
        assert cost["total_bytes"] == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.analyze_load_balance(torch.tensor([[0, 4]])), "indices"),
        (lambda s: s.analyze_load_balance(torch.tensor([[0.0, 1.0]])), "integer"),
        (lambda s: s.analyze_load_balance([1, -2]), "counts"),
        (lambda s: s.simulate_skewed(-1.0), "skew_factor"),
        (lambda s: s.estimate_communication_cost([3, 1, 0, 0], 2), "per-token"),
        (lambda s: s.estimate_communication_cost(torch.tensor([[0, 1]]), 0), "num_devices"),
        (lambda s: s.estimate_communication_cost(torch.tensor([[0, 1]]), 2, placement=[0, 2]),
         "placement"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValidationError, match=match):
        call(RoutingSimulator(4, 4, 2))


def test_bad_construction():
    with pytest.raises(ValidationError, match="top_k"):
        RoutingSimulator(4, 4, 5)
    with pytest.raises(ValidationError, match="num_tokens"):
        RoutingSimulator(4, 0, 1)


def test_analysis_exports_are_the_intended_names():
    import moe_router.analysis as analysis

    assert sorted(analysis.__all__) == sorted([
        "BenchmarkConfig", "BenchmarkResult", "BenchmarkTarget", "ComparisonProfiler",
        "DynamicMoEBenchmark", "FLOPProfiler", "PlacementPlan", "RoutingSimulator",
        "build_router_from_dict", "contiguous_placement", "dynamic_router_factory",
        "imbalance", "latency_metrics", "load_balance_metrics", "plan_placement",
        "results_to_markdown", "routing_flops", "static_topk_router_factory",
    ])
    assert all(hasattr(analysis, name) for name in analysis.__all__)
