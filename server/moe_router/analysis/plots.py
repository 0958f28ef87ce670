"""PNG charts of benchmark results, drawn with matplotlib's Agg canvas (no display, no pyplot).

Figures are built as ``matplotlib.figure.Figure`` objects on a ``FigureCanvasAgg``, so
drawing never touches pyplot's global state or the process-wide backend and is safe
from any thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moe_router.analysis.benchmark_results import BenchmarkResult

__all__ = [
    "plot_latency_vs_tokens",
    "plot_expert_load",
    "plot_throughput_vs_concurrency",
    "save_benchmark_plots",
]


def _label(result: BenchmarkResult) -> str:
    """The setup a result belongs to, without its input shape."""
    p = result.parameters
    parts = [str(p.get("router", result.config_name))]
    if "num_experts" in p:
        parts.append(f"E={p['num_experts']}")
    if "min_experts" in p and "max_experts" in p:
        parts.append(f"k={p['min_experts']}-{p['max_experts']}")
    if "hidden_dim" in p:
        parts.append(f"D={p['hidden_dim']}")
    if "target" in p:
        parts.append(str(p["target"]))
    return " ".join(parts)


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_latency_vs_tokens(results: Sequence[BenchmarkResult], path: Path) -> Path | None:
    """p50 (solid, dots) and p95 (dashed) latency against tokens per call, one colour per setup.

    Uses latency and scaling results; returns None when there are none.
    """
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in results:
        if r.parameters.get("benchmark") in ("latency", "scaling") and "p50_ms" in r.metrics:
            key = f"{_label(r)} [{r.parameters['benchmark']}]"
            series.setdefault(key, []).append(
                (int(r.parameters["num_tokens"]), r.metrics["p50_ms"], r.metrics["p95_ms"]))
    if not series:
        return None
    fig, ax = _figure()
    for label, points in series.items():
        # Several shapes can share a token count (1x8, 2x4): markers for each, the lines
        # through the mean at each count.
        by_tokens: dict[int, list[tuple[float, float]]] = {}
        for tokens, p50, p95 in points:
            by_tokens.setdefault(tokens, []).append((p50, p95))
        xs = sorted(by_tokens)
        p50s = [sum(v[0] for v in by_tokens[t]) / len(by_tokens[t]) for t in xs]
        p95s = [sum(v[1] for v in by_tokens[t]) / len(by_tokens[t]) for t in xs]
        line = ax.plot(xs, p50s, label=f"{label} p50")[0]
        color = line.get_color()
        ax.plot(xs, p95s, linestyle="--", color=color, label=f"{label} p95")
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=14)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens per call")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Routing latency vs tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_expert_load(results: Sequence[BenchmarkResult], path: Path) -> Path | None:
    """Grouped bars: each setup's share of assignments per expert (mean over its results),
    with the uniform share 1/E dashed. Returns None when no result carries expert loads."""
    shares: dict[str, list[list[float]]] = {}
    for r in results:
        loads = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in r.metrics.items()
                       if k.startswith("expert_load_") and k.rsplit("_", 1)[1].isdigit())
        if loads:
            shares.setdefault(_label(r), []).append([v for _, v in loads])
    if not shares:
        return None
    fig, ax = _figure()
    width = 0.8 / len(shares)
    max_experts = 0
    for i, (label, rows) in enumerate(shares.items()):
        num = min(len(row) for row in rows)
        mean = [sum(row[e] for row in rows) / len(rows) for e in range(num)]
        ax.bar([e + i * width for e in range(num)], mean, width=width, label=label)
        ax.axhline(1.0 / num, linestyle="--", linewidth=0.8, color="grey")
        max_experts = max(max_experts, num)
    ax.set_xticks([e + 0.4 - width / 2 for e in range(max_experts)])
    ax.set_xticklabels([str(e) for e in range(max_experts)])
    ax.set_xlabel("expert")
    ax.set_ylabel("share of assignments")
    ax.set_title("Per-expert load (dashed: uniform)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_throughput_vs_concurrency(
    results: Sequence[BenchmarkResult], path: Path
) -> Path | None:
    """Tokens/s against concurrent callers, one line per setup and shape (None if none)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if "concurrent_requests" in r.parameters and "tokens_per_s" in r.metrics:
            key = f"{_label(r)} {r.parameters.get('batch_size')}x{r.parameters.get('seq_len')}"
            series.setdefault(key, []).append(
                (int(r.parameters["concurrent_requests"]), r.metrics["tokens_per_s"]))
    if not series:
        return None
    fig, ax = _figure()
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def save_benchmark_plots(results: Iterable[BenchmarkResult], output_dir: Path) -> list[Path]:
    """Write every chart the results support under ``output_dir``; returns the PNG paths."""
    items = list(results)
    output_dir = Path(output_dir)
    charts = (
        (plot_latency_vs_tokens, "latency_vs_tokens.png"),
        (plot_expert_load, "expert_load.png"),
        (plot_throughput_vs_concurrency, "throughput_vs_concurrency.png"),
    )
    written = [draw(items, output_dir / name) for draw, name in charts]
    return [p for p in written if p is not None]
