"""The routing math of functional.py on hand-calculated cases, and transformers where it has one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_router.routing import functional as F
from moe_router.routing.router_config import ScoringFunction


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------- scoring and top-k
def test_score_softmax_and_sigmoid_by_hand():
    logits = _t([[0.0, math.log(3.0)]])
    torch.testing.assert_close(F.score(logits, ScoringFunction.SOFTMAX), _t([[0.25, 0.75]]))
    torch.testing.assert_close(F.score(logits, ScoringFunction.SIGMOID), _t([[0.5, 0.75]]))


def test_score_upcasts_half_precision_to_fp32():
    logits = _t([[1.0, 2.0]], dtype=torch.bfloat16)
    assert F.score(logits, ScoringFunction.SOFTMAX).dtype == torch.float32


def test_topk_lowest_index_breaks_ties_toward_lower_index():
    values, indices = F.topk_lowest_index(_t([[1.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]]), 3)
    assert indices.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert values.tolist() == [[3.0, 3.0, 1.0], [2.0, 2.0, 2.0]]


def test_renormalize_rows_sum_to_one():
    weights = _t([[1.0, 3.0], [2.0, 2.0]])
    torch.testing.assert_close(F.renormalize(weights), _t([[0.25, 0.75], [0.5, 0.5]]))


def test_tokens_per_expert_ignores_padding():
    counts = F.tokens_per_expert(torch.tensor([[0, 2], [2, -1], [-1, -1]]), num_experts=4)
    assert counts.tolist() == [1, 0, 2, 0]


def test_gate_block_rows_is_the_next_power_of_two_up_to_256():
    assert [F.gate_block_rows(n) for n in (0, 1, 2, 3, 5, 8, 9, 200, 256, 257, 4096)] == [
        1, 1, 2, 4, 8, 8, 16, 256, 256, 256, 256]


@pytest.mark.parametrize("block", [1, 8, 64, 256])
def test_batch_invariant_linear_rows_do_not_depend_on_their_block_mates(block):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen)
    x = torch.randn(37, 40, generator=gen)
    others = torch.randn(3 * block, 40, generator=gen)
    alone = F.batch_invariant_linear(x, weight, block_rows=block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, (-37) % block))
    merged = F.batch_invariant_linear(torch.cat([others, padded]), weight, block_rows=block)
    torch.testing.assert_close(merged[3 * block : 3 * block + 37], alone, rtol=0, atol=0)
    torch.testing.assert_close(alone, x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_batch_invariant_linear_ignores_where_its_input_starts_in_memory():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 64, generator=gen)
    x = torch.randn(4, 64, generator=gen)
    expected = F.batch_invariant_linear(x, weight)
    for offset in (4, 20, 36):  # float32 views that start off the 64-byte grid
        buffer = bytearray(offset) + bytearray(x.numpy().tobytes())
        view = torch.frombuffer(buffer, dtype=torch.float32, offset=offset).reshape(4, 64)
        assert view.data_ptr() % 64
        torch.testing.assert_close(F.batch_invariant_linear(view, weight), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("rows", "dim", "block"), [(37, 40, 16), (5, 33, 2), (256, 64, 256)])
def test_aligned_blocks_of_an_off_grid_input_hold_it_and_zeros_elsewhere(rows, dim, block):
    """The copy of an input off the 64-byte grid is made into uninitialised memory: the
    padding rows and the gaps between blocks are zeroed, the rest is the input."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, dim, generator=gen)
    buffer = bytearray(4) + bytearray(x.numpy().tobytes())
    view = torch.frombuffer(buffer, dtype=torch.float32, offset=4).reshape(rows, dim)
    for _ in range(3):  # memory the allocator hands out again holds NaNs
        torch.full((4 * rows * dim + 4096,), float("nan"))
        blocks = F._aligned_blocks(view, block)
        storage = torch.tensor([], dtype=torch.float32).set_(blocks.untyped_storage())
        per_block = blocks.stride(0)
        whole = storage[: blocks.shape[0] * per_block].view(blocks.shape[0], per_block)
        assert torch.equal(blocks.reshape(-1, dim)[:rows], x)
        assert not whole[:, block * dim :].any() and not blocks.reshape(-1, dim)[rows:].any()


# ----------------------------------------------------------------- losses
def test_aux_loss_four_experts_by_hand():
    probs = _t([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])
    # k=1: f = [1/2, 1/2, 0, 0], P = [0.4, 0.4, 0.1, 0.1] -> 4 * (0.2 + 0.2) = 1.6
    torch.testing.assert_close(F.compute_aux_loss(probs, torch.tensor([[0], [1]]), 1), _t(1.6))
    # k=2 with a padded slot: counts [1, 1, 1, 0] / 4 -> 4 * (0.1 + 0.1 + 0.025) = 0.9
    indices = torch.tensor([[0, -1], [1, 2]])
    torch.testing.assert_close(F.compute_aux_loss(probs, indices, 2), _t(0.9))


def test_aux_loss_of_uniform_routing_is_exactly_one():
    num_tokens, num_experts, k = 8, 4, 2
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    indices = torch.arange(num_tokens * k).reshape(num_tokens, k) % num_experts
    assert float(F.compute_aux_loss(probs, indices, k)) == 1.0


def test_aux_loss_of_no_tokens_is_zero():
    no_indices = torch.zeros(0, 2, dtype=torch.long)
    assert float(F.compute_aux_loss(torch.zeros(0, 4), no_indices, 2)) == 0.0


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_aux_loss_is_transformers_load_balancing_loss_over_k(top_k: int):
    """transformers divides counts by T only, so its value is k times ours."""
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(top_k))
    probs = torch.softmax(logits, dim=-1)
    _, indices = torch.topk(probs, top_k, dim=-1)
    reference = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    ours = F.compute_aux_loss(probs, indices, top_k)
    torch.testing.assert_close(ours * top_k, reference.float(), rtol=1e-6, atol=1e-6)


def test_seq_aux_loss_by_hand():
    probs = _t([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.5, 0.5]])
    indices = torch.tensor([[0], [0], [0], [1]])
    # seq 0: f=[1,0], P=[.85,.15] -> 1.7; seq 1: f=[.5,.5], P=[.5,.5] -> 1.0; mean 1.35
    torch.testing.assert_close(F.compute_seq_aux_loss(probs, indices, 1, seq_len=2), _t(1.35))


def test_seq_aux_loss_of_one_sequence_is_the_aux_loss():
    probs = torch.softmax(torch.randn(12, 6, generator=torch.Generator().manual_seed(1)), -1)
    indices = F.topk_lowest_index(probs, 2)[1]
    torch.testing.assert_close(
        F.compute_seq_aux_loss(probs, indices, 2, seq_len=12), F.compute_aux_loss(probs, indices, 2)
    )


def test_seq_aux_loss_rejects_a_seq_len_that_does_not_divide():
    with pytest.raises(ValueError, match="seq_len 5"):
        F.compute_seq_aux_loss(torch.ones(12, 2) / 2, torch.zeros(12, 1, dtype=torch.long), 1, 5)


def test_z_loss_by_hand():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean(1, 4) * ln2^2
    logits = _t([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(F.compute_z_loss(logits), _t(2.5 * math.log(2.0) ** 2))
    assert float(F.compute_z_loss(torch.zeros(0, 3))) == 0.0


# ----------------------------------------------------------------- balance score and padding
def test_load_balance_score():
    assert F.load_balance_score(torch.tensor([5, 5, 5, 5])) == 1.0
    assert F.load_balance_score(torch.tensor([0, 8, 0, 0])) == 0.25
    assert F.load_balance_score(torch.tensor([1, 2, 3, 4])) == pytest.approx(100 / 120)
    assert F.load_balance_score(torch.tensor([10, 20, 30, 40])) == F.load_balance_score(
        torch.tensor([1, 2, 3, 4])
    )
    assert F.load_balance_score(torch.zeros(4, dtype=torch.long)) == 1.0


def test_pad_selection_moves_real_slots_first():
    indices = torch.tensor([[-1, 2, 0], [1, -1, -1], [-1, -1, -1]])
    weights = _t([[0.9, 0.6, 0.4], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out_idx, out_w, counts = F.pad_selection(indices, weights)
    assert out_idx.dtype == torch.int32 and out_w.dtype == torch.float32
    assert counts.dtype == torch.int32
    assert out_idx.tolist() == [[2, 0, -1], [1, -1, -1], [-1, -1, -1]]
    # The 0.9 sat on a padded slot: it becomes 0.
    torch.testing.assert_close(out_w, _t([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert counts.tolist() == [2, 1, 0]


def test_top_k_mask_picks_the_same_set_as_topk_lowest_index_ties_included():
    gen = torch.Generator().manual_seed(0)
    levels = _t([0.1, 0.3, 0.3, 0.7])  # few values: many ties at the k-th place
    for k in (1, 2, 3, 5, 8):
        values = levels[torch.randint(0, 4, (64, 8), generator=gen)]
        expected = torch.zeros(64, 8, dtype=torch.bool)
        expected.scatter_(1, F.topk_lowest_index(values, k)[1], True)
        assert torch.equal(F.top_k_mask(values, k), expected)
        assert F.top_k_mask(values, k).sum(-1).tolist() == [k] * 64


@pytest.mark.parametrize(("rows", "width"), [(1, 256), (64, 33), (32, 64), (16, 128),
                                             (8, 256), (2048, 8), (1024, 32)])
def test_topk_lowest_index_on_large_inputs_equals_the_stable_sort_ties_or_not(rows, width):
    # Large inputs take torch.topk and fall back to the sort only on a tie; small ones
    # sort: every path must give the stable sort's values and indices, in its order.
    gen = torch.Generator().manual_seed(width)
    distinct = torch.randn(rows, width, generator=gen)
    tied = torch.randint(0, 5, (rows, width), generator=gen).float()  # ties everywhere
    masked = distinct.masked_fill(torch.rand(rows, width, generator=gen) < 0.7,
                                  float("-inf"))
    for values in (distinct, tied, masked):
        for k in (1, 2, 8, width - 1):
            by_sort = torch.sort(values, dim=-1, descending=True, stable=True)
            got_values, got_indices = F.topk_lowest_index(values, k)
            assert torch.equal(got_indices, by_sort.indices[:, :k])
            assert torch.equal(got_values, by_sort.values[:, :k])
    # the grouped router's shape: [T, groups, experts per group]
    grouped = torch.randn(64, 8, 32, generator=gen)
    by_sort = torch.sort(grouped, dim=-1, descending=True, stable=True)
    assert torch.equal(F.topk_lowest_index(grouped, 2)[1], by_sort.indices[..., :2])


def test_tensor_fields_name_every_tensor_field_of_router_output() -> None:
    import dataclasses
    import typing

    from moe_router.routing.output import TENSOR_FIELDS, RouterOutput

    hints = typing.get_type_hints(RouterOutput)
    tensors = {f.name for f in dataclasses.fields(RouterOutput) if "Tensor" in str(hints[f.name])}
    assert set(TENSOR_FIELDS) == tensors

