"""plan_placement: hand cases with known answers and properties of every plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.analysis import contiguous_placement, imbalance, plan_placement
from moe_router.errors import ValidationError


def test_contiguous_placement_blocks():
    assert contiguous_placement(4, 2) == [0, 0, 1, 1]
    assert contiguous_placement(5, 2) == [0, 0, 0, 1, 1]
    assert contiguous_placement(2, 4) == [0, 2]


def test_lpt_hand_case_without_replicas():
    # Contiguous: {0,1} -> 7, {2,3} -> 3; mean 5, imbalance 1.4.
    # LPT: 4->d0, 3->d1, 2->d1 (3 < 4), 1->d0  => loads [5, 5].
    plan = plan_placement([4, 3, 2, 1], num_devices=2)
    assert plan.method == "greedy"
    assert plan.device_load_before == (7.0, 3.0)
    assert plan.imbalance_before == pytest.approx(1.4)
    assert plan.experts_on_device == ((0, 3), (1, 2))
    assert plan.device_of_expert == (0, 1, 1, 0)
    assert plan.device_load == (5.0, 5.0)
    assert plan.imbalance_after == 1.0
    assert plan.max_load == 5.0 and plan.mean_load == 5.0


def test_redundant_slot_replicates_hot_expert_hand_case():
    # 3 slots per device (2 + 1). Replicas: expert 0 (6 -> 3 + 3), then the next hottest
    # per-replica load is 2 (experts 1, 2, 3; lowest id wins): expert 1 -> 1 + 1.
    # LPT over (0:3, 0:3, 2:2, 3:2, 1:1, 1:1): d0 = {0, 2, 1} = 6, d1 = {0, 3, 1} = 6.
    plan = plan_placement(torch.tensor([6, 2, 2, 2]), num_devices=2, redundant_slots=1)
    assert plan.slots_per_device == 3
    assert plan.replicas == ((0, 1), (0, 1), (0,), (1,))
    assert plan.experts_on_device == ((0, 1, 2), (0, 1, 3))
    assert plan.device_load == (6.0, 6.0)
    assert plan.device_load_before == (8.0, 4.0)
    assert plan.imbalance_before == pytest.approx(8 / 6)
    assert plan.imbalance_after == 1.0


def test_never_worse_than_contiguous():
    # LPT gives 3,3 -> d0,d1; 2 -> d0; 2 -> d1; 2 -> d0 = [7, 5]; contiguous is [6, 6].
    plan = plan_placement(np.array([2, 2, 2, 3, 3]), num_devices=2)
    assert plan.method == "contiguous"
    assert plan.device_load == (6.0, 6.0)
    assert plan.device_of_expert == (0, 0, 0, 1, 1)


def test_imbalance_definition():
    assert imbalance([3.0, 1.0]) == 1.5
    assert imbalance([0.0, 0.0]) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.integers(0, 1000), min_size=1, max_size=24),
    devices=st.integers(1, 6),
    redundant=st.integers(0, 2),
)
def test_plan_properties(loads, devices, redundant):
    plan = plan_placement(loads, devices, redundant_slots=redundant)
    assert len(plan.replicas) == len(loads)
    for e, devs in enumerate(plan.replicas):
        assert len(devs) >= 1 and len(set(devs)) == len(devs)
        assert plan.device_of_expert[e] == devs[0]
        for d in devs:
            assert e in plan.experts_on_device[d]
    assert all(len(held) <= plan.slots_per_device for held in plan.experts_on_device)
    # Loads recomputed from replicas (each replica takes an even share) match and sum up.
    recomputed = [0.0] * devices
    for e, devs in enumerate(plan.replicas):
        for d in devs:
            recomputed[d] += loads[e] / len(devs)
    np.testing.assert_allclose(plan.device_load, recomputed, atol=1e-9)
    assert sum(plan.device_load) == pytest.approx(sum(loads))
    assert plan.imbalance_after <= plan.imbalance_before + 1e-12


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (([], 2), "expert_load"),
        (([1, -1], 2), "expert_load"),
        (([1, float("nan")], 2), "expert_load"),
        (([1, 2], 0), "num_devices"),
        (([1, 2], 2, -1), "redundant_slots"),
    ],
)
def test_bad_arguments(args, name):
    with pytest.raises(ValidationError, match=name):
        plan_placement(*args)


def test_plan_to_dict_is_json_ready():
    import json

    plan = plan_placement([6, 2, 2, 2], num_devices=2, redundant_slots=1)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["replicas"] == [[0, 1], [0, 1], [0], [1]]
    assert data["imbalance_after"] == 1.0 and data["method"] == "greedy"
