"""The bench's ratio axes stay readable: a narrow span of ratios still gets labels."""

from __future__ import annotations

import pytest

from moe_router.analysis.bench_plots import RatioLocator


def _ticks(low: float, high: float) -> list[float]:
    locator = RatioLocator(base=10, subs=RatioLocator.WIDE_SUBS)
    return [round(float(t), 6) for t in locator.tick_values(low, high) if low <= t <= high]


def test_a_wide_span_is_labelled_at_1_2_5():
    assert _ticks(0.15, 4.0) == [0.2, 0.5, 1.0, 2.0]


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.92, 1.35, [1.0, 1.2]),  # a matmul-bound router's ours / plain and plain / matmul
    (0.9, 1.6, [1.0, 1.2, 1.5]),
    (1.1, 3.5, [1.2, 1.5, 2.0, 3.0]),
])
def test_a_narrow_span_gets_ticks_between(low: float, high: float, expected: list[float]):
    assert _ticks(low, high) == expected
