"""PNG plots of one ``moe-router bench`` run's ratios: one picture per question.

- ``grpc_over_echo.png``: gRPC door p50 / echo p50 against tokens, a line per callers and
  dtype, one panel per router (the 1.3x target of 1 token dotted);
- ``throughput_scaling.png``: req/s against callers, gRPC solid and echo dashed, a colour
  per token count, a panel per router and dtype;
- ``inprocess_ratios.png``: our router / plain PyTorch, plain / matmul and ours / matmul
  against tokens, a panel per router;
- ``colocated_over_inprocess.png`` (when the shared-memory door was measured): its p50 /
  our router in-process against tokens, 1 caller.

The legend of each picture sits outside every panel, to the right (saved with a tight
bounding box), so it never covers data. Figures are drawn on matplotlib's Agg canvas
without pyplot, so drawing touches no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator

from moe_router.analysis.bench_figures import CellKey, Figures, Ratio

__all__ = ["PLOTS", "bench_plot_figures", "save_bench_plots"]

_DTYPE_STYLE = {"float32": "-", "bfloat16": "--"}
_FLOOR = {"color": "grey", "linewidth": 0.8, "linestyle": "-"}
_TARGET = {"color": "tab:red", "linewidth": 1.0, "linestyle": ":"}


def _panels(count: int, title: str, rows: int = 1) -> tuple[Figure, list[Axes]]:
    cols = max(1, -(-count // rows))
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    fig.suptitle(title)
    return fig, axes


def _token_axis(ax: Axes, tokens: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(tokens))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("tokens per call")
    ax.grid(True, which="major", alpha=0.3)


def _legend_outside(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the whole figure, right of every panel."""
    seen: dict[str, Line2D] = {}
    for ax in axes:
        for line in ax.get_lines():
            label = str(line.get_label())
            if not label.startswith("_"):
                seen.setdefault(label, line)  # type: ignore[arg-type]
    fig.tight_layout()
    fig.legend(list(seen.values()), list(seen), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)


def _series(ratios: Sequence[Ratio], name: str) -> dict[CellKey, list[tuple[int, float]]]:
    """Ratio ``name`` by (router, dtype, callers): its (tokens, value) points."""
    found: dict[CellKey, list[tuple[int, float]]] = {}
    for r in ratios:
        if r.key.benchmark == name and r.key.tokens is not None:
            group = CellKey(name, r.key.router, r.key.dtype, None, r.key.concurrency)
            found.setdefault(group, []).append((r.key.tokens, r.value))
    return {k: sorted(v) for k, v in found.items()}


def _routers(ratios: Sequence[Ratio], *names: str) -> list[str]:
    return list(dict.fromkeys(str(r.key.router) for r in ratios
                              if r.key.benchmark in names and r.key.router is not None))


class RatioLocator(LogLocator):
    """Log ticks at 1, 2, 5 x 10^n; on an axis spanning less than a factor of
    :attr:`NARROW` also at 1.2, 1.5, 3 and 7 x 10^n, so that a panel of ratios between 0.9
    and 1.5 (a matmul-bound router) is not left with the single label 1."""

    NARROW = 4.0
    WIDE_SUBS = (1.0, 2.0, 5.0)
    NARROW_SUBS = (1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.0)

    def tick_values(self, vmin: float, vmax: float) -> Any:
        """The ticks for the view ``vmin`` .. ``vmax`` (either order)."""
        low, high = sorted((vmin, vmax))
        narrow = low > 0 and high / low < self.NARROW
        self.set_params(subs=self.NARROW_SUBS if narrow else self.WIDE_SUBS)
        return super().tick_values(vmin, vmax)


def _log_ratio_axis(ax: Axes) -> None:
    """Log y with :class:`RatioLocator` ticks written as plain numbers (``0.5``, ``1.2``,
    ``20``)."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_locator(RatioLocator(base=10, subs=RatioLocator.WIDE_SUBS))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def _hline(ax: Axes, y: float, style: dict[str, object], label: str) -> None:
    ax.axhline(y, label=label, **style)  # type: ignore[arg-type]


def grpc_over_echo(figures: Figures, ratios: Sequence[Ratio]) -> Figure | None:
    """gRPC p50 / echo p50 by tokens; a line per callers (colour) and dtype (style)."""
    series = _series(ratios, "grpc_over_echo_p50")
    routers = _routers(ratios, "grpc_over_echo_p50")
    if not series:
        return None
    fig, axes = _panels(len(routers), "gRPC door p50 / echo p50 (same bytes, same callers)")
    levels = sorted({int(k.concurrency or 0) for k in series})
    colours = {c: f"C{i}" for i, c in enumerate(levels)}
    for ax, router in zip(axes, routers, strict=True):
        tokens = []
        for key, points in series.items():
            if key.router == router:
                tokens += [t for t, _ in points]
                ax.plot(*zip(*points, strict=True), marker="o",
                        color=colours[int(key.concurrency or 0)],
                        linestyle=_DTYPE_STYLE.get(str(key.dtype), "-"),
                        label=f"{key.concurrency} caller(s), {key.dtype}")
        _hline(ax, 1.0, _FLOOR, "echo (floor)")
        _hline(ax, 1.3, _TARGET, "target at 1 token, 1 caller: 1.3x")
        _token_axis(ax, tokens)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("p50 / echo p50")
        ax.set_title(router)
    _legend_outside(fig, axes)
    return fig


def throughput_scaling(figures: Figures, ratios: Sequence[Ratio]) -> Figure | None:
    """req/s against callers: gRPC solid, echo dashed, a colour per token count."""
    doors = figures.keys("grpc")
    panels = list(dict.fromkeys((str(k.router), str(k.dtype)) for k in doors))
    if not panels or all(k.concurrency == 1 for k in doors):
        return None
    fig, axes = _panels(len(panels), "Throughput against callers: gRPC door (solid) vs echo "
                        "(dashed)", rows=2 if len(panels) > 2 else 1)
    token_counts = sorted({int(k.tokens or 0) for k in doors})
    colours = {t: f"C{i}" for i, t in enumerate(token_counts)}
    for ax, (router, dtype) in zip(axes, panels, strict=False):
        for tokens in token_counts:
            for benchmark, style in (("grpc", "-"), ("echo", "--")):
                points = sorted((int(k.concurrency or 0), v) for k in figures.keys(benchmark)
                                if k.router == router and k.dtype == dtype and k.tokens == tokens
                                and (v := figures.metric(k, "requests_per_s")) is not None)
                if len(points) > 1:
                    ax.plot(*zip(*points, strict=True), marker="o", linestyle=style,
                            color=colours[tokens], label=f"{benchmark}, {tokens} tokens")
        ax.set_xscale("log", base=2)
        levels = sorted({int(k.concurrency or 0) for k in doors})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel("requests / s")
        ax.set_title(f"{router} {dtype}")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _legend_outside(fig, axes[:len(panels)])
    return fig


def inprocess_ratios(figures: Figures, ratios: Sequence[Ratio]) -> Figure | None:
    """Our router / plain, plain / matmul and ours / matmul by tokens, a panel per router."""
    names = {"ours_over_plain_p50": ("ours / plain", "C0"),
             "plain_over_matmul_p50": ("plain / matmul", "C1"),
             "ours_over_matmul_p50": ("ours / matmul", "C2")}
    routers = _routers(ratios, *names)
    if not routers:
        return None
    fig, axes = _panels(len(routers), "In-process p50: our router vs plain PyTorch routing vs "
                        "the bare gate matmul")
    for ax, router in zip(axes, routers, strict=True):
        tokens = []
        for name, (label, colour) in names.items():
            for key, points in _series(ratios, name).items():
                if key.router == router:
                    tokens += [t for t, _ in points]
                    ax.plot(*zip(*points, strict=True), marker="o", color=colour,
                            linestyle=_DTYPE_STYLE.get(str(key.dtype), "-"),
                            label=f"{label}, {key.dtype}")
        _hline(ax, 1.0, _FLOOR, "equal cost")
        _hline(ax, 1.2, _TARGET, "targets for ours / plain: 1.2x at 1 token, 1.05x from 256")
        ax.axhline(1.05, **_TARGET)  # type: ignore[arg-type]
        _token_axis(ax, tokens)
        _log_ratio_axis(ax)
        ax.set_ylabel("p50 ratio")
        ax.set_title(router)
    _legend_outside(fig, axes)
    return fig


def colocated_over_inprocess(figures: Figures, ratios: Sequence[Ratio]) -> Figure | None:
    """Shared-memory door p50 / our router in-process p50 by tokens, 1 caller."""
    series = _series(ratios, "colocated_over_ours_p50")
    routers = _routers(ratios, "colocated_over_ours_p50")
    if not series:
        return None
    fig, axes = _panels(len(routers), "Shared-memory door p50 / our router in-process p50, "
                        "1 caller")
    for ax, router in zip(axes, routers, strict=True):
        tokens = []
        for key, points in series.items():
            if key.router == router:
                tokens += [t for t, _ in points]
                ax.plot(*zip(*points, strict=True), marker="o", color="C0",
                        linestyle=_DTYPE_STYLE.get(str(key.dtype), "-"), label=str(key.dtype))
        _hline(ax, 1.0, _FLOOR, "in-process (floor)")
        _hline(ax, 1.5, _TARGET, "target at 2048 tokens bf16: 1.5x")
        _token_axis(ax, tokens)
        _log_ratio_axis(ax)
        ax.set_ylabel("p50 / in-process p50")
        ax.set_title(router)
    _legend_outside(fig, axes)
    return fig


PLOTS: dict[str, Callable[[Figures, Sequence[Ratio]], Figure | None]] = {
    "grpc_over_echo.png": grpc_over_echo,
    "throughput_scaling.png": throughput_scaling,
    "inprocess_ratios.png": inprocess_ratios,
    "colocated_over_inprocess.png": colocated_over_inprocess,
}
"""File name -> the function drawing it (None when the run has nothing to draw)."""


def bench_plot_figures(figures: Figures, ratios: Sequence[Ratio]) -> dict[str, Figure]:
    """Every picture the run supports, by file name (not yet saved)."""
    drawn = {name: draw(figures, ratios) for name, draw in PLOTS.items()}
    return {name: fig for name, fig in drawn.items() if fig is not None}


def save_bench_plots(figures: Figures, ratios: Sequence[Ratio], output_dir: Path
                     ) -> list[Path]:
    """Write every picture the run supports under ``output_dir``; returns the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in bench_plot_figures(figures, ratios).items():
        path = output_dir / name
        fig.savefig(path, format="png", bbox_inches="tight")
        paths.append(path)
    return paths
