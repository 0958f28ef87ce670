"""RequestStatsBackend: counts, failures of our own, latency window, expert load by layer."""

from __future__ import annotations

import asyncio

import pytest
import torch
from chain_backends import HIDDEN, FaultyBackend, TopKBackend, make_call

from moe_router.chain.request_stats import RequestFigures, RequestStatsBackend
from moe_router.errors import (
    BackendError,
    CircuitOpenError,
    NotFoundError,
    OverloadedError,
    ValidationError,
)


async def _outcomes(stage, calls):
    return await asyncio.gather(*(stage.route(c) for c in calls), return_exceptions=True)


def test_counts_tokens_and_per_layer_expert_load_of_answered_calls() -> None:
    inner = TopKBackend()
    stage = RequestStatsBackend(inner, layers=3, experts=8)
    calls = [make_call(layer=0, seed_tensor=1), make_call(layer=2, seed_tensor=2),
             make_call(torch.randn(2, 3, HIDDEN), layer=2)]
    results = asyncio.run(_outcomes(stage, calls))
    figures = stage.stats()
    assert isinstance(figures, RequestFigures)
    assert (figures.requests, figures.tokens, figures.errors, figures.failures) == (3, 14, 0, 0)
    assert figures.expert_load[0] == tuple(results[0].output.tokens_per_expert.tolist())
    assert figures.expert_load[1] == (0,) * 8
    layer2 = results[1].output.tokens_per_expert + results[2].output.tokens_per_expert
    assert figures.expert_load[2] == tuple(layer2.tolist())
    # top-2 for every one of the 14 tokens
    assert figures.experts_per_token[2] == 14 and sum(figures.experts_per_token) == 14
    assert figures.assignments == 28 and figures.avg_experts_per_token == 2.0
    assert sum(figures.tokens_per_expert) == 28
    assert figures.latency.samples == 3 and figures.latency.p50_ms > 0


def test_load_figures_against_hand_calculations() -> None:
    figures = RequestFigures(
        requests=1, tokens=2, errors=0, failures=0, error_rate=0.0,
        latency=RequestStatsBackend(TopKBackend(), layers=1, experts=2).stats().latency,
        expert_load=((3, 1), (1, 3)), experts_per_token=(0, 4, 2), dropped_tokens=0)
    assert figures.tokens_per_expert == (4, 4)
    assert figures.assignments == 1 * 4 + 2 * 2
    assert figures.load_balance_score == pytest.approx(1.0)  # even over all layers
    assert figures.usage_variance == 0.0 and figures.load_share_variance == 0.0
    skewed = RequestFigures(**{**figures.__dict__, "expert_load": ((3, 1),)})
    # shares 0.75 / 0.25: population variance 0.0625; Jain = 16 / (2 * 10) = 0.8
    assert skewed.load_share_variance == pytest.approx(0.0625)
    assert skewed.load_balance_score == pytest.approx(0.8)


@pytest.mark.parametrize("exc", [ValidationError("bad"), NotFoundError("layer 9"),
                                 OverloadedError("full"), CircuitOpenError("open")])
def test_callers_mistakes_and_load_shedding_are_errors_but_not_failures(exc) -> None:
    stage = RequestStatsBackend(FaultyBackend(lambda c: exc), layers=1, experts=8)
    asyncio.run(_outcomes(stage, [make_call()]))
    figures = stage.stats()
    assert (figures.requests, figures.errors, figures.failures) == (1, 1, 0)
    assert figures.error_rate == 0.0 and figures.tokens == 0


def test_failures_of_our_own_set_the_error_rate() -> None:
    plan = iter([None, BackendError("device lost"), RuntimeError("cuda"), None])
    stage = RequestStatsBackend(FaultyBackend(lambda c: next(plan)), layers=1, experts=8)
    asyncio.run(_outcomes(stage, [make_call(seed_tensor=i) for i in range(4)]))
    figures = stage.stats()
    assert (figures.requests, figures.errors, figures.failures) == (4, 2, 2)
    assert figures.error_rate == 0.5


def test_no_calls_no_rates() -> None:
    figures = RequestStatsBackend(TopKBackend(), layers=2, experts=8).stats()
    assert figures.error_rate is None and figures.load_share_variance is None
    assert figures.latency.samples == 0 and figures.avg_experts_per_token == 0.0


def test_pending_answers_fold_into_totals_and_the_recent_window_in_order(monkeypatch) -> None:
    # Answers are added to a pending list and folded every 256 calls, when the window's
    # bucket moves on, and when read: every way must give the same figures as adding
    # each call on its own, and an answer must land in the bucket of the time it came.
    from moe_router.chain import request_stats as rs

    load = rs._ExpertLoad(layers=2, experts=4, window_s=10.0)
    now = [100.0]
    monkeypatch.setattr(rs.time, "monotonic", lambda: now[0])
    load._current_start = now[0]
    expected = torch.zeros(2, 4, dtype=torch.int64)
    per_k = torch.zeros(5, dtype=torch.int64)
    for i in range(600):  # two automatic folds (256, 512) and a remainder
        counts = torch.tensor([i % 3, 1, 0, 2])
        per_token = torch.full((i % 5 + 1,), 2, dtype=torch.int32)
        out = type("Out", (), {"tokens_per_expert": counts, "dropped_tokens": 1,
                               "num_experts_per_token": per_token})
        load.add(i % 2, type("Result", (), {"output": out})())
        expected[i % 2] += counts
        per_k[2] += i % 5 + 1
    total, recent, got_per_k, dropped = load.snapshot()
    assert torch.equal(torch.tensor(total), expected)
    assert torch.equal(torch.tensor(recent), expected)  # all in the current window
    assert torch.equal(torch.tensor(got_per_k), per_k) and dropped == 600
    # Pending answers of a bucket the ring has left go to that bucket, then age out.
    out = type("Out", (), {"tokens_per_expert": torch.tensor([0, 0, 0, 7]),
                           "dropped_tokens": 0,
                           "num_experts_per_token": torch.tensor([2], dtype=torch.int32)})
    load.add(0, type("Result", (), {"output": out})())
    now[0] += 5.0  # half the window later: the pending call is still recent
    assert load.snapshot()[1][0][3] == expected[0, 3] + 7
    now[0] += 10.0  # a whole window later: nothing is recent, the totals stay
    total, recent, _, _ = load.snapshot()
    assert recent == ((0, 0, 0, 0), (0, 0, 0, 0))
    assert total[0][3] == expected[0, 3] + 7
