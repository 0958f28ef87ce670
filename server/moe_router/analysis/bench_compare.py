"""``moe-router bench --compare OLD.json``: what got faster or slower between two runs.

Two JSON twins (``service_bench.json``) are compared cell by cell: each door's and
floor's p50 and req/s, each in-process peer's p50, and every p50 and throughput ratio
against the floors (recomputed from both runs' raw results by
:func:`~moe_router.analysis.bench_figures.derived_ratios`, so a twin written before a
ratio existed still compares; p99 ratios are left out, too noisy to compare). Per
cell: old, new, new/old and the change in percent.

**When a change is marked.** On a shared machine two runs of the same code differ a lot:
an A/A test here (``--preset quick`` twice, back to back, 2 cores at load average 4-7
from other work) moved single cells by a median 30-40% and some by 3-5x. No fixed
threshold is right for every machine and hour, so the threshold is measured from the
two runs themselves: the floors (the echo server and the bare matmul) run no code of the
router, so how much *they* moved between the two runs is an A/A measurement of those
very runs. A change is marked faster or slower only when

- it is beyond the 90th percentile of the floors' own moves (:func:`estimate_noise`: the
  echo's figures for door cells and their ratios, the matmul's for in-process cells and
  theirs), and never below :data:`NOISE_FLOOR` (10%);
- and, for a p50 of which both runs stored a ~95% interval of the median
  (``p50_low_ms``/``p50_high_ms``), the two intervals do not overlap.

So about one floor figure in ten is itself marked: the machine moved that much. Where
the two runs measured the floors differently (another machine, another
``inprocess_threads``), the floors' moves are not noise; the threshold then comes out
large, and the header line says so in figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moe_router.analysis.bench_figures import CellKey, Figures, derived_ratios
from moe_router.analysis.benchmark_results import BenchmarkResult

__all__ = ["Change", "NOISE_FLOOR", "Noise", "UNCALIBRATED_NOISE", "compare_reports",
           "comparison_to_text", "estimate_noise"]

NOISE_FLOOR = 0.10
"""Relative change below which a cell is never marked, however quiet the floors were."""
UNCALIBRATED_NOISE = 0.30
"""The threshold where fewer than :data:`_MIN_FLOOR_FIGURES` floor figures are in both
runs: the A/A median on the shared development machine."""
_MIN_FLOOR_FIGURES = 3
_QUANTILE = 0.9
_INPROCESS = frozenset({"ours", "plain", "matmul", "ours_over_plain_p50",
                        "plain_over_matmul_p50", "ours_over_matmul_p50"})

_COMPARED: dict[str, tuple[tuple[str, bool], ...]] = {
    # benchmark -> (metric, higher is better) compared for it
    "grpc": (("p50_ms", False), ("requests_per_s", True), ("server_cpu_us_per_call", False)),
    "colocated": (("p50_ms", False), ("requests_per_s", True),
                  ("server_cpu_us_per_call", False)),
    "echo": (("p50_ms", False), ("requests_per_s", True), ("server_cpu_us_per_call", False)),
    "ours": (("p50_ms", False),),
    "plain": (("p50_ms", False),),
    "matmul": (("p50_ms", False),),
    "malloc_untuned": (("mb_per_s", True),),
    "malloc_tuned": (("mb_per_s", True),),
}
_FLOORS = {"doors": ("echo", ("p50_ms", "requests_per_s")), "inprocess": ("matmul", ("p50_ms",))}


@dataclass(frozen=True)
class Noise:
    """The thresholds of one comparison: relative change for door cells (and their
    ratios) and for in-process cells, and how many floor figures each is measured from
    (0: :data:`UNCALIBRATED_NOISE`)."""

    doors: float
    inprocess: float
    door_figures: int
    inprocess_figures: int

    def of(self, key: CellKey) -> float:
        """The threshold of one cell or ratio."""
        return self.inprocess if key.benchmark in _INPROCESS else self.doors


@dataclass(frozen=True)
class Change:
    """One cell's metric in both runs, and whether the change is beyond the noise."""

    cell: CellKey
    metric: str
    old: float
    new: float
    higher_is_better: bool
    marked: bool

    @property
    def ratio(self) -> float:
        """new / old."""
        return self.new / self.old if self.old else float("inf")

    @property
    def percent(self) -> float:
        """The change in percent of the old figure."""
        return (self.ratio - 1.0) * 100.0

    @property
    def verdict(self) -> str:
        """``faster`` / ``slower`` when marked (by the metric's better direction), else ''."""
        if not self.marked:
            return ""
        return "faster" if (self.new > self.old) == self.higher_is_better else "slower"


def _figures(twin: Mapping[str, Any]) -> Figures:
    return Figures(BenchmarkResult.from_dict(r) for r in twin.get("results", ()))


def _disjoint(old: Figures, new: Figures, key: CellKey) -> bool:
    """Whether both runs' p50 intervals exist and do not overlap (True when either lacks
    one: the threshold alone decides)."""
    bounds = [(f.metric(key, "p50_low_ms"), f.metric(key, "p50_high_ms")) for f in (old, new)]
    if any(low is None or high is None for low, high in bounds):
        return True
    (old_low, old_high), (new_low, new_high) = bounds
    return bool(old_high < new_low or new_high < old_low)  # type: ignore[operator]


def _moves(before: Figures, after: Figures, benchmark: str, metrics: Iterable[str]
           ) -> list[float]:
    moves = []
    for key in after.keys(benchmark):
        for metric in metrics:
            was, now = before.metric(key, metric), after.metric(key, metric)
            if was and now and was > 0 and now > 0:
                moves.append(abs(now / was - 1.0))
    return sorted(moves)


def estimate_noise(before: Figures, after: Figures, floor: float = NOISE_FLOOR) -> Noise:
    """The 90th percentile of how much the floors' figures moved between the two runs
    (echo p50 and req/s for the doors, matmul p50 in-process), at least ``floor``."""
    thresholds, counts = {}, {}
    for group, (benchmark, metrics) in _FLOORS.items():
        moves = _moves(before, after, benchmark, metrics)
        counts[group] = len(moves) if len(moves) >= _MIN_FLOOR_FIGURES else 0
        if counts[group]:
            rank = min(len(moves) - 1, int(_QUANTILE * len(moves)))
            thresholds[group] = max(floor, moves[rank])
        else:
            thresholds[group] = max(floor, UNCALIBRATED_NOISE)
    return Noise(thresholds["doors"], thresholds["inprocess"], counts["doors"],
                 counts["inprocess"])


def compare_reports(old: Mapping[str, Any], new: Mapping[str, Any],
                    noise: Noise | None = None) -> tuple[list[Change], Noise]:
    """Every cell and ratio present in both twins, in the new run's order, and the
    thresholds used (``noise``, or :func:`estimate_noise` of the two runs)."""
    before, after = _figures(old), _figures(new)
    noise = noise or estimate_noise(before, after)
    changes: list[Change] = []

    def add(key: CellKey, metric: str, was: float | None, now: float | None,
            higher: bool, p50_interval: bool = False) -> None:
        if was is None or now is None or was <= 0 or now <= 0:
            return
        beyond = abs(now / was - 1.0) > noise.of(key)
        if beyond and p50_interval:
            beyond = _disjoint(before, after, key)
        changes.append(Change(key, metric, was, now, higher, beyond))

    for key in after.keys(*_COMPARED):
        for metric, higher in _COMPARED[key.benchmark]:
            add(key, metric, before.metric(key, metric), after.metric(key, metric), higher,
                p50_interval=metric == "p50_ms")
    old_ratios = {r.key: r.value for r in derived_ratios(before)}
    for ratio in derived_ratios(after):
        # differences (µs) can cross zero and p99s are too noisy: not compared as ratios
        if ratio.kind.unit == "x" and not ratio.key.benchmark.endswith("_p99"):
            add(ratio.key, "ratio", old_ratios.get(ratio.key), ratio.value,
                ratio.kind.higher_is_better)
    return changes, noise


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def comparison_to_text(changes: Iterable[Change], noise: Noise, old: Mapping[str, Any],
                       new: Mapping[str, Any]) -> str:
    """A plain-text table: one line per compared cell, marked ones flagged, and a count."""
    items = list(changes)

    def basis(count: int, floor: str) -> str:
        return (f"the 90th percentile of the {floor}'s {count} figures' moves" if count else
                f"uncalibrated: too few {floor} figures in both runs")

    load = [twin.get("machine", {}).get("load_average_1m", 0.0) for twin in (old, new)]
    lines = [f"Compared with {old.get('date', '?')} (`{old.get('command', '?')}`) -> "
             f"{new.get('date', '?')}; load average at start {load[0]:.2f} -> {load[1]:.2f}",
             f"Marked beyond +-{noise.doors:.0%} for the doors "
             f"({basis(noise.door_figures, 'echo')}) and +-{noise.inprocess:.0%} in-process "
             f"({basis(noise.inprocess_figures, 'matmul')}); a p50 also only outside both "
             f"runs' 95% intervals of the median.", ""]
    width = max((len(c.cell.label()) for c in items), default=4)
    lines.append(f"{'cell':<{width}}  {'metric':<14} {'old':>10} {'new':>10} {'new/old':>8} "
                 f"{'change':>8}")
    for c in items:
        lines.append(f"{c.cell.label():<{width}}  {c.metric:<14} {_number(c.old):>10} "
                     f"{_number(c.new):>10} {c.ratio:>7.3f}x {c.percent:>+7.1f}%  {c.verdict}")
    faster = sum(c.verdict == "faster" for c in items)
    slower = sum(c.verdict == "slower" for c in items)
    lines += ["", f"{len(items)} cells compared: {faster} faster, {slower} slower, "
              f"{len(items) - faster - slower} within the noise."]
    return "\n".join(lines)
