"""One bench run's figures looked up by cell, and the ratios against the floors.

Every measurement of ``moe-router bench`` is a
:class:`~moe_router.analysis.benchmark_results.BenchmarkResult` whose ``parameters``
name its :class:`CellKey`: what was measured (``benchmark``) and where in the sweep
(router, dtype, tokens, callers). The benchmarks:

| benchmark | what |
|---|---|
| ``grpc`` | Route through the gRPC door, from separate client processes |
| ``colocated`` | Route through the shared-memory door, same clients |
| ``echo`` | the transport floor: a bare grpc.aio server carrying the same bytes |
| ``ours`` | our router in-process (the module the server hosts) |
| ``plain`` | plain PyTorch routing in-process |
| ``matmul`` | the bare gate matmul in-process (the compute floor) |
| ``malloc_untuned`` / ``malloc_tuned`` | 16 MiB echoes without / with the malloc tuning |

:func:`derived_ratios` computes every ratio of :data:`RATIOS` that the run's cells
support; the report, the targets, the plots and ``--compare`` all read them from here,
so a ratio has one definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from moe_router.analysis.benchmark_results import BenchmarkResult

__all__ = ["CellKey", "Figures", "Ratio", "RatioKind", "RATIOS", "derived_ratios",
           "median_interval"]

_LEGACY_NAMES = {"service": "grpc", "eager": "plain"}
"""Benchmark names of JSON twins written before the doors were told apart."""


@dataclass(frozen=True)
class CellKey:
    """Which measurement: ``benchmark`` (a table row of the module docstring, or a ratio
    name) at router, input dtype, tokens per call and concurrent callers (None where the
    measurement has no such axis: in-process cells have no callers)."""

    benchmark: str
    router: str | None = None
    dtype: str | None = None
    tokens: int | None = None
    concurrency: int | None = None

    @classmethod
    def of(cls, parameters: dict[str, Any]) -> CellKey:
        """The key a result's parameters name (legacy names mapped to today's)."""
        benchmark = str(parameters["benchmark"])
        if benchmark == "malloc":  # legacy: one name, the variant in malloc_tuning
            benchmark = "malloc_tuned" if parameters.get("malloc_tuning") == "on" \
                else "malloc_untuned"
        return cls(_LEGACY_NAMES.get(benchmark, benchmark), parameters.get("router"),
                   parameters.get("dtype"), parameters.get("tokens"),
                   parameters.get("concurrency"))

    def label(self) -> str:
        """``grpc mixtral float32 T=1 c=4``: the parts that are set."""
        parts = [self.benchmark, self.router, self.dtype,
                 None if self.tokens is None else f"T={self.tokens}",
                 None if self.concurrency is None else f"c={self.concurrency}"]
        return " ".join(p for p in parts if p is not None)


class Figures:
    """The results of one run by :class:`CellKey` (a later result of the same key wins)."""

    def __init__(self, results: Iterable[BenchmarkResult]) -> None:
        self._cells: dict[CellKey, BenchmarkResult] = {}
        for result in results:
            self._cells[CellKey.of(result.parameters)] = result

    def metric(self, key: CellKey, name: str) -> float | None:
        """One metric of one cell; None when the cell or the metric is missing."""
        result = self._cells.get(key)
        return None if result is None else result.metrics.get(name)

    def parameters(self, key: CellKey) -> dict[str, Any]:
        """The cell's parameters ({} when missing)."""
        result = self._cells.get(key)
        return {} if result is None else dict(result.parameters)

    def keys(self, *benchmarks: str) -> list[CellKey]:
        """The keys of those benchmarks, in the order they were measured."""
        return [k for k in self._cells if k.benchmark in benchmarks]

    def __contains__(self, key: object) -> bool:
        return key in self._cells


@dataclass(frozen=True)
class RatioKind:
    """What a ratio divides, and which way is better."""

    meaning: str
    higher_is_better: bool = False
    unit: str = "x"


RATIOS: dict[str, RatioKind] = {
    "grpc_over_echo_p50": RatioKind("gRPC p50 / echo p50 (same bytes, same callers)"),
    "grpc_over_echo_p99": RatioKind("gRPC p99 / echo p99"),
    "grpc_over_echo_rps": RatioKind("gRPC req/s / echo req/s", higher_is_better=True),
    "grpc_over_echo_cpu": RatioKind("gRPC server CPU per call / echo server CPU per call "
                                    "(same bytes, same callers)"),
    "grpc_scaling": RatioKind("gRPC req/s at c callers / at 1 caller", higher_is_better=True),
    "echo_scaling": RatioKind("echo req/s at c callers / at 1 caller", higher_is_better=True),
    "grpc_over_floor_p50": RatioKind("gRPC p50 / (echo p50 + matmul p50), 1 caller"),
    "grpc_over_plain_p50": RatioKind("gRPC p50 / plain PyTorch routing p50, 1 caller"),
    "colocated_over_ours_p50": RatioKind("co-located p50 / our router in-process p50, "
                                         "1 caller"),
    "colocated_extra_us": RatioKind("co-located p50 - our router in-process p50, 1 caller",
                                    unit="µs"),
    "colocated_over_grpc_p50": RatioKind("co-located p50 / gRPC p50 (same callers)"),
    "ours_over_plain_p50": RatioKind("our router p50 / plain PyTorch routing p50"),
    "plain_over_matmul_p50": RatioKind("plain routing p50 / bare matmul p50"),
    "ours_over_matmul_p50": RatioKind("our router p50 / bare matmul p50"),
    "malloc_tuned_over_untuned": RatioKind("16 MiB echo MB/s, malloc tuned / untuned",
                                           higher_is_better=True),
}


@dataclass(frozen=True)
class Ratio:
    """One derived figure: ``key.benchmark`` is its :data:`RATIOS` name."""

    key: CellKey
    value: float

    @property
    def kind(self) -> RatioKind:
        """Its row of :data:`RATIOS`."""
        return RATIOS[self.key.benchmark]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the key's fields and the value."""
        k = self.key
        return {"name": k.benchmark, "router": k.router, "dtype": k.dtype, "tokens": k.tokens,
                "concurrency": k.concurrency, "value": self.value}


def _divide(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def derived_ratios(figures: Figures) -> list[Ratio]:
    """Every ratio of :data:`RATIOS` the run supports, in sweep order."""
    found: list[Ratio] = []

    def add(name: str, at: CellKey, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            found.append(Ratio(replace(at, benchmark=name), value))

    get = figures.metric
    for door in figures.keys("grpc", "colocated"):
        echo, alone = replace(door, benchmark="echo"), replace(door, concurrency=None)
        first = replace(door, concurrency=1)
        p50 = get(door, "p50_ms")
        if door.benchmark == "grpc":
            add("grpc_over_echo_p50", door, _divide(p50, get(echo, "p50_ms")))
            add("grpc_over_echo_p99", door, _divide(get(door, "p99_ms"), get(echo, "p99_ms")))
            add("grpc_over_echo_rps", door, _divide(get(door, "requests_per_s"),
                                                    get(echo, "requests_per_s")))
            add("grpc_over_echo_cpu", door, _divide(get(door, "server_cpu_us_per_call"),
                                                    get(echo, "server_cpu_us_per_call")))
            if door.concurrency != 1:
                for name, cell in (("grpc_scaling", door), ("echo_scaling", echo)):
                    add(name, door, _divide(get(cell, "requests_per_s"),
                                            get(replace(cell, concurrency=1),
                                                "requests_per_s")))
            if door.concurrency == 1:
                echo_p50 = get(echo, "p50_ms")
                matmul_p50 = get(replace(alone, benchmark="matmul"), "p50_ms")
                floor = None if echo_p50 is None or matmul_p50 is None else echo_p50 + matmul_p50
                add("grpc_over_floor_p50", door, _divide(p50, floor))
                add("grpc_over_plain_p50", door,
                    _divide(p50, get(replace(alone, benchmark="plain"), "p50_ms")))
        else:
            add("colocated_over_grpc_p50", door,
                _divide(p50, get(replace(door, benchmark="grpc"), "p50_ms")))
            if door == first:
                ours = get(replace(alone, benchmark="ours"), "p50_ms")
                add("colocated_over_ours_p50", door, _divide(p50, ours))
                if p50 is not None and ours is not None:
                    add("colocated_extra_us", door, (p50 - ours) * 1e3)
    peers = dict.fromkeys(replace(k, benchmark="") for k in figures.keys("ours", "plain"))
    for cell in peers:
        ours, plain, matmul = (get(replace(cell, benchmark=name), "p50_ms")
                               for name in ("ours", "plain", "matmul"))
        add("ours_over_plain_p50", cell, _divide(ours, plain))
        add("plain_over_matmul_p50", cell, _divide(plain, matmul))
        add("ours_over_matmul_p50", cell, _divide(ours, matmul))
    untuned, tuned = figures.keys("malloc_untuned"), figures.keys("malloc_tuned")
    if untuned and tuned:
        add("malloc_tuned_over_untuned", CellKey(""),
            _divide(get(tuned[0], "mb_per_s"), get(untuned[0], "mb_per_s")))
    return found


def median_interval(latencies_ms: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% interval of the median: the order statistics of (1-based)
    ranks ``floor(n/2 - z sqrt(n)/2)`` and ``ceil(1 + n/2 + z sqrt(n)/2)`` (the
    binomial(n, 1/2) normal approximation), clipped to the sample. Calls of a closed
    loop are not independent, so read it as a lower bound on the p50's uncertainty."""
    ordered = sorted(latencies_ms)
    n = len(ordered)
    half_width = z * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half_width) - 1)
    high = min(n - 1, math.ceil(1 + n / 2 + half_width) - 1)
    return ordered[low], ordered[high]
