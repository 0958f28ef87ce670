"""Token dropping (routing/capacity.py) on hand-calculated cases, through the routers too.

Each router here has an identity gate and is fed log-probabilities, so the softmax
scores are exactly the probabilities written in the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import GroupedTopKRouter, RouterConfig, TopKRouter
from moe_router.routing import capacity as C
from moe_router.routing.router_config import CapacityPriority, DropPolicy


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _router(num_experts: int, cls=TopKRouter, **config) -> TopKRouter:
    router = cls(RouterConfig(hidden_size=num_experts, num_experts=num_experts, **config))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def _route(router, probs) -> object:
    with torch.no_grad():
        return router(_t(probs).log())


# ----------------------------------------------------------------- the capacity formula
@pytest.mark.parametrize(
    ("tokens", "k", "experts", "factor", "expected"),
    [(10, 2, 4, 1.0, 5), (10, 2, 4, 1.25, 7), (8, 1, 16, 1.0, 1), (64, 8, 16, 2.0, 64),
     (512, 2, 8, 1.0, 128), (256, 8, 256, 1.25, 10)],
)
def test_expert_capacity(tokens: int, k: int, experts: int, factor: float, expected: int):
    assert C.expert_capacity(tokens, k, experts, factor) == expected


def test_capacity_for_takes_the_absolute_capacity_or_the_factor():
    absolute = RouterConfig(hidden_size=4, num_experts=4, expert_capacity=3)
    factor = RouterConfig(hidden_size=4, num_experts=4, capacity_factor=1.5)
    assert C.capacity_for(absolute, 1000, 2) == 3
    assert C.capacity_for(factor, 10, 2) == math.ceil(10 * 2 / 4 * 1.5) == 8


# ----------------------------------------------------------------- apply_capacity by hand
def test_probs_policy_keeps_the_highest_final_weights_then_the_earliest():
    indices = torch.tensor([[0], [0], [0], [1], [0]])
    weights = _t([[0.5], [0.9], [0.9], [1.0], [0.9]])
    kept = C.apply_capacity(indices, weights, 2, DropPolicy.PROBS, num_experts=4)
    # Expert 0 has tokens 0 (.5), 1, 2, 4 (.9 each): keeps tokens 1 and 2 (tie -> earlier).
    assert kept.indices.flatten().tolist() == [-1, 0, 0, 1, -1]
    assert kept.weights.flatten().tolist() == pytest.approx([0.0, 0.9, 0.9, 1.0, 0.0])
    assert kept.dropped == 2 and kept.expert_tokens is None


def test_position_policy_keeps_the_earliest_tokens():
    indices = torch.tensor([[0], [0], [0], [1], [0]])
    weights = _t([[0.5], [0.9], [0.9], [1.0], [0.9]])
    kept = C.apply_capacity(indices, weights, 2, DropPolicy.POSITION, num_experts=4)
    assert kept.indices.flatten().tolist() == [0, 0, -1, 1, -1]
    assert kept.dropped == 2


def test_padding_is_not_counted_and_slots_follow_their_token():
    indices = torch.tensor([[2, -1], [2, 3], [3, 2]])
    weights = _t([[1.0, 0.0], [0.6, 0.4], [0.7, 0.3]])
    kept = C.apply_capacity(indices, weights, 1, DropPolicy.POSITION, num_experts=4)
    # Expert 2 keeps token 0, expert 3 keeps token 1's slot 1; padding is not counted.
    assert kept.indices.tolist() == [[2, -1], [-1, 3], [-1, -1]]
    assert kept.dropped == 3


@pytest.mark.parametrize("policy", [DropPolicy.PROBS, DropPolicy.POSITION])
def test_sixteen_experts_each_keep_one_of_their_two_tokens(policy: DropPolicy):
    # Tokens 2e and 2e+1 both go to expert e (e < 8); odd tokens have the higher weight.
    indices = (torch.arange(16) // 2).unsqueeze(1)
    weights = _t([0.3 if t % 2 == 0 else 0.6 for t in range(16)]).unsqueeze(1)
    kept = C.apply_capacity(indices, weights, 1, policy, num_experts=16)
    survivors = (kept.indices.flatten() >= 0).nonzero().flatten().tolist()
    first = 1 if policy is DropPolicy.PROBS else 0
    assert survivors == list(range(first, 16, 2))
    assert kept.dropped == 8


def test_a_large_enough_capacity_drops_nothing():
    indices = torch.tensor([[0, 1], [1, 0]])
    weights = _t([[0.6, 0.4], [0.5, 0.5]])
    kept = C.apply_capacity(indices, weights, 2, DropPolicy.PROBS, num_experts=4)
    assert torch.equal(kept.indices, indices) and torch.equal(kept.weights, weights)
    assert kept.dropped == 0


def test_slot_priority_with_probs_needs_the_probabilities():
    with pytest.raises(ValueError, match="needs probs"):
        C.apply_capacity(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), 1,
                         DropPolicy.PROBS, num_experts=2, priority=CapacityPriority.SLOT)


# ----------------------------------------------------------------- issue 9: Megatron's rule
def test_the_issue_minimal_case_keeps_what_megatron_keeps():
    """E=4, k=2, renormalize, capacity ceil(2*2/4*1.0) = 1.

    Final weights: token 0 -> e0 .6/.9 = .667, e1 .3/.9 = .333; token 1 -> e0 .30/.58 =
    .517, e1 .28/.58 = .483. Expert 0 keeps token 0 (.667 > .517), expert 1 keeps token 1
    (.483 > .333). Ranking by the softmax over all experts instead (.3 > .28 at expert 1)
    kept token 0 on both and dropped both of token 1's experts.
    """
    router = _router(4, top_k=2, capacity_factor=1.0)
    out = _route(router, [[0.6, 0.3, 0.05, 0.05], [0.30, 0.28, 0.21, 0.21]])
    assert out.expert_indices.tolist() == [[0, -1], [1, -1]]
    torch.testing.assert_close(out.expert_weights, _t([[0.6 / 0.9, 0.0], [0.28 / 0.58, 0.0]]))
    assert out.num_experts_per_token.tolist() == [1, 1]
    assert out.dropped_tokens == 2
    assert out.tokens_per_expert.tolist() == [1, 1, 0, 0]
    # Aux loss from the routing map BEFORE dropping: f = [.5, .5, 0, 0],
    # P = [.45, .29, .13, .13] -> 4 * (.5 * .45 + .5 * .29) = 1.48.
    assert float(out.aux_loss) == pytest.approx(1.48, abs=1e-6)


def test_dropping_never_changes_the_aux_loss():
    gen = torch.Generator().manual_seed(3)
    config = dict(hidden_size=32, num_experts=8, top_k=2)
    free = TopKRouter(RouterConfig(**config)).eval()
    dropping = TopKRouter(RouterConfig(**config, capacity_factor=0.5)).eval()
    dropping.load_state_dict(free.state_dict())
    x = torch.randn(256, 32, generator=gen)
    with torch.no_grad():
        a, b = free(x, return_losses=True), dropping(x, return_losses=True)
    assert b.dropped_tokens > 0
    assert int(b.tokens_per_expert.sum()) == 512 - b.dropped_tokens
    assert torch.equal(a.aux_loss, b.aux_loss)


def test_with_k1_and_renormalize_every_weight_is_one_so_the_earliest_tokens_win():
    # Megatron ranks by the final weight; after renormalising one expert it is 1.0 for
    # every token, so the probs policy cannot tell tokens apart (ties -> earlier).
    router = _router(2, top_k=1, capacity_factor=1.0)
    out = router(_t([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]]))
    assert out.expert_indices.flatten().tolist() == [0, 0, -1, -1]


def test_with_k1_without_renormalize_the_most_confident_tokens_win():
    router = _router(2, top_k=1, capacity_factor=1.0, renormalize=False)
    out = router(_t([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]]))
    assert out.expert_indices.flatten().tolist() == [-1, 0, -1, 0]
    assert out.dropped_tokens == 2 and out.tokens_per_expert.tolist() == [2, 0]
    assert router.couples_tokens_now


# ----------------------------------------------------------------- issue 13: priorities
def test_slot_priority_lets_every_first_choice_claim_capacity_first():
    """E=2, k=2, capacity 2, position policy; tokens prefer e0, e1, e0.

    expert priority (token, then slot): e0 sees t0, t1 (2nd), t2 -> keeps t0, t1;
    e1 sees t0 (2nd), t1, t2 (2nd) -> keeps t0, t1; token 2 loses both.
    slot priority: e0 sees t0, t2, then t1 (2nd) -> keeps t0, t2; e1 sees t1, then
    t0 (2nd), t2 (2nd) -> keeps t1, t0; every token keeps its first choice.
    """
    probs = [[0.7, 0.3], [0.3, 0.7], [0.7, 0.3]]
    common = dict(top_k=2, expert_capacity=2, drop_policy="position")
    by_expert = _route(_router(2, **common), probs)
    by_slot = _route(_router(2, **common, capacity_priority="slot"), probs)
    assert by_expert.expert_indices.tolist() == [[0, 1], [1, 0], [-1, -1]]
    assert by_slot.expert_indices.tolist() == [[0, 1], [1, -1], [0, -1]]
    assert by_expert.dropped_tokens == by_slot.dropped_tokens == 2


def test_slot_priority_with_probs_ranks_tokens_by_their_first_choice_probability():
    """E=6, k=2, renormalize, capacity 1. Both tokens choose e0 then e1.

    A: p = .50 (e0), .45 (e1) -> weights .526, .474;  B: p = .45, .12 -> .789, .211.
    slot + probs (NLLB's batch prioritized routing): A is more important (.50 > .45)
    and wins both experts. expert + probs (Megatron): e0 goes to the larger final
    weight, B (.789 > .526); e1 to A (.474 > .211).
    """
    probs = [[0.50, 0.45, 0.02, 0.01, 0.01, 0.01], [0.45, 0.12, 0.11, 0.11, 0.11, 0.10]]
    by_slot = _route(_router(6, top_k=2, expert_capacity=1, capacity_priority="slot"), probs)
    by_expert = _route(_router(6, top_k=2, expert_capacity=1), probs)
    assert by_slot.expert_indices.tolist() == [[0, 1], [-1, -1]]
    assert by_expert.expert_indices.tolist() == [[1, -1], [0, -1]]


def test_slot_priority_with_position_keeps_token_order_inside_a_slot():
    probs = [[0.6, 0.4], [0.9, 0.1]]
    common = dict(top_k=1, renormalize=False, expert_capacity=1, capacity_priority="slot")
    assert _route(_router(2, **common, drop_policy="position"),
                  probs).expert_indices.tolist() == [[0], [-1]]
    assert _route(_router(2, **common), probs).expert_indices.tolist() == [[-1], [0]]


# ----------------------------------------------------------------- per-sequence, absolute
def test_an_absolute_capacity_keeps_that_many_per_expert():
    router = _router(2, top_k=1, renormalize=False, expert_capacity=3, drop_policy="position")
    out = _route(router, [[0.9, 0.1]] * 5)
    assert out.expert_indices.flatten().tolist() == [0, 0, 0, -1, -1]
    assert out.dropped_tokens == 2


@pytest.mark.parametrize(
    ("capacity", "scope", "kept"),
    [
        (dict(expert_capacity=1), "call", [[0, -1, -1], [-1, -1, -1]]),
        (dict(expert_capacity=1), "sequence", [[0, -1, -1], [0, -1, -1]]),
        # factor 1.0: per call ceil(6*1/2) = 3, per sequence ceil(3*1/2) = 2.
        (dict(capacity_factor=1.0), "call", [[0, 0, 0], [-1, -1, -1]]),
        (dict(capacity_factor=1.0), "sequence", [[0, 0, -1], [0, 0, -1]]),
    ],
)
def test_capacity_per_sequence_gives_each_row_its_own(capacity, scope, kept):
    router = _router(2, top_k=1, renormalize=False, drop_policy="position",
                     capacity_scope=scope, **capacity)
    out = router(_t([[0.9, 0.1]] * 6).log().reshape(2, 3, 2))
    assert out.expert_indices.squeeze(-1).tolist() == kept


def test_a_flat_input_is_one_sequence():
    common = dict(top_k=1, renormalize=False, expert_capacity=2, drop_policy="position")
    x = _t([[0.9, 0.1]] * 5).log()
    by_call = _router(2, **common)(x)
    by_sequence = _router(2, **common, capacity_scope="sequence")(x)
    assert torch.equal(by_call.expert_indices, by_sequence.expert_indices)


# ----------------------------------------------------------------- renormalise after dropping
@pytest.mark.parametrize(("after", "expected"), [(False, [1.4, 1.6]), (True, [2.0, 2.0])])
def test_renormalize_after_drop_rescales_the_kept_weights(after, expected):
    """E=2, k=2, capacity 1, slot priority: t0 keeps e0 (.7), t1 keeps e1 (.8); scale 2.

    Renormalised before dropping (Megatron, NLLB's default) the kept weights stay
    2 * .7 and 2 * .8; after dropping (NLLB normalize_router_prob_before_dropping=False)
    each token's one kept weight becomes 2 * 1.
    """
    router = _router(2, top_k=2, expert_capacity=1, capacity_priority="slot",
                     routed_scaling_factor=2.0, renormalize_after_drop=after)
    out = _route(router, [[0.7, 0.3], [0.2, 0.8]])
    assert out.expert_indices.tolist() == [[0, -1], [1, -1]]
    torch.testing.assert_close(out.expert_weights[:, 0], _t(expected))


def test_a_token_that_loses_every_slot_keeps_zero_weights_after_renormalising():
    router = _router(2, top_k=2, expert_capacity=1, renormalize_after_drop=True,
                     drop_policy="position")
    out = _route(router, [[0.7, 0.3], [0.6, 0.4]])
    assert out.expert_indices.tolist() == [[0, 1], [-1, -1]]
    assert out.expert_weights[1].tolist() == [0.0, 0.0]
    assert out.expert_weights[0].sum().item() == pytest.approx(1.0)


# ----------------------------------------------------------------- pad_to_capacity
def test_pad_to_capacity_answers_each_experts_tokens_in_fixed_shape():
    router = _router(4, top_k=2, capacity_factor=1.0, pad_to_capacity=True)
    out = _route(router, [[0.6, 0.3, 0.05, 0.05], [0.30, 0.28, 0.21, 0.21]])
    assert out.expert_tokens.dtype == torch.int32
    assert out.expert_tokens.tolist() == [[0], [1], [-1], [-1]]  # [E, C=1]
    torch.testing.assert_close(out.expert_token_weights,
                               _t([[0.6 / 0.9], [0.28 / 0.58], [0.0], [0.0]]))


def test_pad_to_capacity_per_sequence_blocks_columns_by_sequence():
    # 2 sequences of 3 tokens, E=2, k=1, capacity 2 per sequence; tokens 0,1,3,4,5 -> e0,
    # token 2 -> e1. Sequence 0: e0 keeps 0,1; e1 keeps 2. Sequence 1: e0 keeps 3,4.
    router = _router(2, top_k=1, renormalize=False, expert_capacity=2, drop_policy="position",
                     capacity_scope="sequence", pad_to_capacity=True)
    probs = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]
    out = router(_t(probs).log().reshape(2, 3, 2))
    assert out.expert_tokens.tolist() == [[0, 1, 3, 4], [2, -1, -1, -1]]  # [E, G*C = 2*2]
    torch.testing.assert_close(out.expert_token_weights, _t([[0.9, 0.8, 0.6, 0.7],
                                                             [0.7, 0.0, 0.0, 0.0]]))
    assert out.expert_indices.squeeze(-1).tolist() == [[0, 0, 1], [0, 0, -1]]


def test_pad_to_capacity_shape_depends_only_on_the_call_size():
    router = _router(4, top_k=2, capacity_factor=1.25, pad_to_capacity=True)
    gen = torch.Generator().manual_seed(0)
    shapes = {tuple(router(torch.randn(16, 4, generator=gen)).expert_tokens.shape)
              for _ in range(5)}
    assert shapes == {(4, C.expert_capacity(16, 2, 4, 1.25))}


def test_without_pad_to_capacity_there_is_no_expert_token_list():
    out = _router(4, top_k=2, capacity_factor=1.0)(torch.randn(8, 4))
    assert out.expert_tokens is None and out.expert_token_weights is None


# ----------------------------------------------------------------- the grouped router's aux loss
def _biased_grouped(**config) -> GroupedTopKRouter:
    router = GroupedTopKRouter(
        RouterConfig(hidden_size=4, num_experts=4, top_k=1, n_group=2, topk_group=1,
                     renormalize=False, **config),
        use_correction_bias=True,
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
        router.e_score_correction_bias.copy_(_t([0.0, 0.0, 0.2, 0.0]))
    return router


def test_grouped_aux_loss_counts_megatrons_plain_top_k_by_default():
    """probs [.4, .1, .3, .2]; the bias (+.2 on e2) moves the choice to group 1, e2.

    top_k (Megatron, DeepSeek-V3 paper): f = [1, 0, 0, 0] -> 4 * .4 = 1.6.
    selected: f = [0, 0, 1, 0] -> 4 * .3 = 1.2.
    """
    probs = [[0.4, 0.1, 0.3, 0.2]]
    default = _route(_biased_grouped(), probs)
    selected = _route(_biased_grouped(aux_loss_assignments="selected"), probs)
    assert default.expert_indices.tolist() == selected.expert_indices.tolist() == [[2]]
    assert float(default.aux_loss) == pytest.approx(1.6)
    assert float(selected.aux_loss) == pytest.approx(1.2)


# ----------------------------------------------------------------- configuration checks
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(capacity_factor=1.0, expert_capacity=4),
         "expert_capacity: give capacity_factor or expert_capacity, not both"),
        (dict(expert_capacity=0), "expert_capacity: must be a positive integer"),
        (dict(expert_capacity=2.5), "expert_capacity: must be a positive integer"),
        (dict(capacity_scope="sequence"), "capacity_scope: only applies with a capacity"),
        (dict(capacity_priority="slot"), "capacity_priority: only applies with a capacity"),
        (dict(pad_to_capacity=True), "pad_to_capacity: only applies with a capacity"),
        (dict(renormalize_after_drop=True), "renormalize_after_drop: only applies"),
        (dict(expert_capacity=2, renormalize=False, renormalize_after_drop=True),
         "renormalize_after_drop: needs renormalize: true"),
        (dict(expert_capacity=2, pad_to_capacity="yes"), "pad_to_capacity: must be true or"),
        (dict(expert_capacity=2, capacity_scope="batch"),
         "capacity_scope: must be one of 'call', 'sequence'"),
        (dict(expert_capacity=2, capacity_priority="token"),
         "capacity_priority: must be one of 'expert', 'slot'"),
        (dict(aux_loss_assignments="kept"),
         "aux_loss_assignments: must be one of 'top_k', 'selected'"),
    ],
)
def test_capacity_options_are_checked_with_the_key_to_fix(fields, message):
    with pytest.raises(RouterConfigurationError, match=message):
        RouterConfig(hidden_size=4, num_experts=4, **fields)


@pytest.mark.parametrize(
    "capacity", [dict(capacity_factor=1.0), dict(expert_capacity=3)]
)
def test_any_capacity_couples_the_tokens_of_a_call(capacity):
    router = _router(4, top_k=2, **capacity)
    assert router.couples_tokens_now
    with pytest.raises(ValidationError, match="couples the tokens"):
        router.route_many([torch.randn(2, 4), torch.randn(3, 4)])
