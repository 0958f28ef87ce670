"""The records both benchmarks produce and the shared Markdown report.

A :class:`BenchmarkResult` is one measurement: what was measured (``parameters``) and
its figures (``metrics``, floats only). :func:`latency_metrics` turns per-call
latencies into the percentiles every table shows; :func:`results_to_markdown` renders
results as one table per benchmark kind. The in-process suite
(:mod:`moe_router.analysis.benchmark`), its plots and ``moe-router bench``
(:mod:`moe_router.analysis.service_bench`) all build on these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moe_router.errors import ValidationError

__all__ = ["BenchmarkResult", "latency_metrics", "results_to_markdown"]


@dataclass
class BenchmarkResult:
    """Results from a benchmark run: what was measured (parameters) and the figures (metrics).

    ``metrics`` holds floats only; per-expert load is flattened to ``expert_load_{i}``
    (share of assignments, summing to 1).
    """

    config_name: str
    parameters: dict[str, Any]
    metrics: dict[str, float]
    timestamp: float

    def to_dict(self) -> dict[str, Any]:
        """Convert to dictionary format (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkResult:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["config_name"]), dict(data["parameters"]),
                   {k: float(v) for k, v in data["metrics"].items()}, float(data["timestamp"]))


def latency_metrics(latencies_ms: Sequence[float], tokens_per_call: int) -> dict[str, float]:
    """p50/p95/p99/mean/min/max/std in ms of per-call latencies, and tokens/s at the mean."""
    ms = np.asarray(latencies_ms, dtype=np.float64)
    if ms.size == 0:
        raise ValidationError("latencies_ms: needs at least one measurement")
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    mean = float(ms.mean())
    return {
        "mean_ms": mean,
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "std_ms": float(ms.std()),
        "tokens_per_s": tokens_per_call / (mean / 1e3) if mean > 0 else float("inf"),
    }


_HEADLINE = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "tokens_per_s", "requests_per_s",
             "relative_throughput", "avg_experts_per_token", "computational_efficiency",
             "load_balance_score")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def results_to_markdown(results: Iterable[BenchmarkResult], title: str = "Benchmark report",
                        interrupted: bool = False) -> str:
    """Markdown tables of ``results``, one per ``parameters['benchmark']`` (or config name).

    A "Setup" line lists the parameters shared by every row; the columns are the scalar
    parameters that vary, then the headline metrics
    present (latency percentiles, tokens/s, experts per token, load balance), then any
    other metric except the per-expert ``expert_load_{i}`` shares.
    """
    groups: dict[str, list[BenchmarkResult]] = {}
    for r in results:
        groups.setdefault(str(r.parameters.get("benchmark", r.config_name)), []).append(r)
    lines = [f"# {title}", ""]
    if interrupted:
        lines += ["> Interrupted: the tables hold the measurements completed before Ctrl-C.", ""]
    if not groups:
        lines.append("No results.")
    for kind, rows in groups.items():
        scalar = list(dict.fromkeys(
            k for r in rows for k, v in r.parameters.items()
            if k != "benchmark" and isinstance(v, (str, int, float, bool))))
        fixed = [k for k in scalar
                 if len({repr(r.parameters.get(k)) for r in rows}) == 1 and len(rows) > 1]
        params = [k for k in scalar if k not in fixed]
        present = dict.fromkeys(k for r in rows for k in r.metrics
                                if not k.startswith("expert_load_"))
        metrics = [k for k in _HEADLINE if k in present]
        metrics += [k for k in present if k not in metrics]
        header = params + metrics
        lines += [f"## {kind}", ""]
        if fixed:
            setup = ", ".join(f"{k}={_cell(rows[0].parameters[k])}" for k in fixed)
            lines += [f"Setup: {setup}", ""]
        lines += ["| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in rows:
            cells = [_cell(r.parameters.get(k, "")) for k in params]
            cells += [_cell(r.metrics[k]) if k in r.metrics else "" for k in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
