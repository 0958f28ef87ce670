"""What one ``moe-router bench`` run found, and its Markdown and JSON report.

:class:`BenchReport` holds the header facts (date, command, machine), the plan, every
result, the columns skipped and why, and the notes; :func:`report_to_markdown` renders
the targets table and one table per question (gRPC vs echo, 1 caller vs the floors,
our router in-process vs plain PyTorch vs the matmul, the shared-memory door vs
in-process, the malloc tuning); :func:`write_report` writes it with its JSON twin and
the plots. The ratios and targets come from :mod:`~moe_router.analysis.bench_figures`
and :mod:`~moe_router.analysis.bench_targets`; :mod:`~moe_router.analysis.service_bench`
fills the report.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch

from moe_router.analysis.bench_figures import CellKey, Figures, Ratio, derived_ratios
from moe_router.analysis.bench_plan import BenchPlan
from moe_router.analysis.bench_targets import TargetOutcome, evaluate_targets
from moe_router.analysis.benchmark_results import BenchmarkResult
from moe_router.config.environment import malloc_variables

__all__ = ["BenchReport", "machine_facts", "load_average", "report_to_markdown",
           "write_report"]


@dataclass
class BenchReport:
    """Everything one run measured: header facts, results, skipped columns (column ->
    one-line reason), notes, the plots drawn, whether Ctrl-C cut it."""

    command: str
    date: str
    machine: dict[str, Any]
    plan: BenchPlan
    target: str | None = None
    results: list[BenchmarkResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    interrupted: bool = False

    def add(self, parameters: dict[str, Any], metrics: dict[str, float]) -> None:
        """Append a result (figures only: every metric positive and finite)."""
        self.results.append(BenchmarkResult("service-bench", parameters, metrics, time.time()))

    def figures(self) -> Figures:
        """The results by cell."""
        return Figures(self.results)

    def ratios(self) -> list[Ratio]:
        """Every ratio against the floors the run supports."""
        return derived_ratios(self.figures())

    def targets(self) -> list[TargetOutcome]:
        """The issue's targets, case by case."""
        return evaluate_targets(self.ratios(), self.figures(), self.machine.get("device", "cpu"),
                                self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the header, the plan, the raw results, the ratios and the targets."""
        plan = asdict(self.plan)
        plan["dtypes"] = [d.value for d in self.plan.dtypes]
        plan["transports"] = [t.value for t in self.plan.transports]
        plan["routers"] = [{**asdict(r), "kind": r.kind.value} for r in self.plan.routers]
        return {"title": "moe-router service benchmark", "command": self.command,
                "date": self.date, "machine": self.machine, "plan": plan, "target": self.target,
                "interrupted": self.interrupted, "skipped": self.skipped, "notes": self.notes,
                "plots": self.plots, "results": [r.to_dict() for r in self.results],
                "ratios": [r.to_dict() for r in self.ratios()],
                "targets": [t.to_dict() for t in self.targets()]}


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def machine_facts(device: torch.device) -> dict[str, Any]:
    """Cores, CPU, OS, library versions and the in-process device, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "os": platform.platform(),
            "load_average_1m": load_average(),
            "python": platform.python_version(), "torch": torch.__version__,
            "grpcio": grpc.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "malloc_env": malloc_variables()}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _header(report: BenchReport) -> list[str]:
    m, plan = report.machine, report.plan
    malloc = " ".join(f"{k}={v}" for k, v in m["malloc_env"].items()) or "none"
    served = ("to a server started for the bench: cache off (every call computes), batching "
              "on, 1 layer, random weights" if report.target is None else
              f"to the running server at {report.target} (its own config; every call sets "
              f"skip_cache)")
    start, end = m["load_average_1m"], m.get("load_average_1m_end", m["load_average_1m"])
    threads = (f"{plan.inprocess_threads} torch thread(s)" if plan.inprocess_threads else
               f"torch's default threads ({m.get('torch_threads', '?')})")
    lines = ["# moe-router service benchmark", "",
             f"- Date: {report.date}", f"- Command: `{report.command}`",
             f"- Machine: {m['cores']} cores ({m['cpu']}), {m['os']}; Python {m['python']}, "
             f"torch {m['torch']} ({m.get('torch_threads', '?')} threads), grpcio {m['grpcio']}; "
             f"in-process device "
             f"{m.get('device_name', m['device'])}, service device "
             f"{m.get('service_device', '-')}; malloc variables: {malloc}",
             f"- **Noise**: 1-min load average {start:.2f} at start, {end:.2f} at end on "
             f"{m['cores']} cores; the run took {m.get('wall_s', 0):.0f} s, "
             f"{m.get('startup_s', 0):.0f} s of it starting the servers. Servers, clients "
             f"and peers share the machine with any other work on it: the ratios compare "
             f"figures measured side by side in this run (a neighbour slows both sides), but "
             f"single cells, and p99 above all, are noisy.",
             f"- Method: Route over loopback {served}; clients in {plan.client_procs} "
             f"separate processes (closed loop); per cell {plan.warmup_s} s warmup + "
             f"{plan.duration_s} s timed in {plan.rounds} rounds, the doors and the echo "
             f"taking turns. **echo** = a bare grpc.aio server carrying the same "
             f"bytes each way; **ours** = the router module the server hosts, built from the "
             f"same config entry, called in-process; **plain** = hand-written eager PyTorch "
             f"routing; **matmul** = `x.float() @ W.T` alone; in-process peers timed in turns "
             f"for at least {plan.inprocess_s} s on {threads} (the server keeps its own "
             f"settings).", ""]
    if plan.event_loop_cpu is not None:
        lines[-1:-1] = [f"- Pinned: the server's event loop and gRPC completion-queue thread "
                        f"on CPU {plan.event_loop_cpu} (`server.event_loop_cpu`), the echo "
                        f"servers' alike."]
    if report.interrupted:
        lines += ["> Interrupted: the tables hold the measurements completed before Ctrl-C.", ""]
    return lines


def _targets_section(outcomes: list[TargetOutcome], machine: dict[str, Any]) -> list[str]:
    rows = []
    for o in outcomes:
        t = o.target
        measured = "-" if o.measured is None else (_x(o.measured) if t.unit == "x"
                                                   else f"{_fmt(o.measured)} {t.unit}")
        verdict = {True: "pass", False: "**fail**", None: f"not measured: {o.reason}"}[o.passed]
        rows.append([t.claim, o.case or "-", measured, t.bound_text(), verdict])
    judged = [o for o in outcomes if o.passed is not None]
    summary = (f"{sum(bool(o.passed) for o in judged)} of {len(judged)} measured cases pass; "
               f"{len(outcomes) - len(judged)} targets not measured.")
    noise = (f"Ratios of figures measured side by side in this run, on a machine shared with "
             f"other work (1-min load average {machine['load_average_1m']:.2f} on "
             f"{machine['cores']} cores at start): a single cell can move by tens of percent "
             f"from one run to the next; `--compare` says which moves are beyond that.")
    return ["## Targets (issue 10)", "", summary, "", noise, "",
            *_table(["target", "case", "measured", "bound", "result"], rows)]


def _grpc_section(figures: Figures, ratios: dict[CellKey, float]) -> list[str]:
    rows = []
    for key in figures.keys("grpc"):
        echo = replace(key, benchmark="echo")

        def ratio(name: str, at: CellKey = key) -> str:
            return _x(ratios.get(replace(at, benchmark=name)))

        rows.append([str(key.router), str(key.dtype), str(key.tokens), str(key.concurrency),
                     *(_fmt(figures.metric(cell, m)) for cell in (key, echo)
                       for m in ("p50_ms", "p99_ms", "requests_per_s")),
                     ratio("grpc_over_echo_p50"), ratio("grpc_over_echo_p99"),
                     ratio("grpc_over_echo_rps"), ratio("grpc_scaling"), ratio("echo_scaling")])
    if not rows:
        return []
    return ["## gRPC door vs the transport floor (echo of the same bytes)", "",
            *_table(["router", "dtype", "tokens", "callers", "gRPC p50 ms", "gRPC p99 ms",
                     "gRPC req/s", "echo p50 ms", "echo p99 ms", "echo req/s", "p50 / echo",
                     "p99 / echo", "req/s / echo", "gRPC req/s / 1 caller",
                     "echo req/s / 1 caller"], rows)]


def _cpu_section(figures: Figures, ratios: dict[CellKey, float]) -> list[str]:
    """The servers' CPU per call: under many callers on a few cores, what bounds req/s."""
    rows = []
    for key in figures.keys("grpc"):
        echo, shm = replace(key, benchmark="echo"), replace(key, benchmark="colocated")
        if figures.metric(key, "server_cpu_us_per_call") is None:
            continue
        rows.append([str(key.router), str(key.dtype), str(key.tokens), str(key.concurrency),
                     *(_cpu_cells(figures, cell) for cell in (key, echo)),
                     _x(ratios.get(replace(key, benchmark="grpc_over_echo_cpu"))),
                     _fmt(figures.metric(shm, "server_cpu_us_per_call"))])
    if not rows:
        return []
    return ["## Server CPU per call", "",
            "CPU time of the server process per answered call over each timed window (all "
            "its threads; in parentheses its event loop's thread alone, and the share of "
            "the window that thread was on a CPU). Read from outside the server "
            "(`moe_router.analysis.server_cpu`); the bench's own servers only. With one "
            "caller it includes the time the service's event loop polls between calls "
            "(`server.busy_poll_us`), which the echo does not do.", "",
            *_table(["router", "dtype", "tokens", "callers", "gRPC µs (loop, busy)",
                     "echo µs (loop, busy)", "gRPC / echo", "shm µs"], rows)]


def _cpu_cells(figures: Figures, cell: CellKey) -> str:
    total, loop, busy = (figures.metric(cell, m) for m in
                         ("server_cpu_us_per_call", "loop_cpu_us_per_call", "loop_busy"))
    if total is None:
        return "-"
    return f"{total:.0f}" + ("" if loop is None or busy is None else f" ({loop:.0f}, {busy:.0%})")


def _floors_section(figures: Figures, ratios: dict[CellKey, float]) -> list[str]:
    rows = []
    for key in figures.keys("grpc"):
        if key.concurrency != 1:
            continue
        alone = replace(key, concurrency=None)
        echo = figures.metric(replace(key, benchmark="echo"), "p50_ms")
        matmul = figures.metric(replace(alone, benchmark="matmul"), "p50_ms")
        rows.append([str(key.router), str(key.dtype), str(key.tokens),
                     _fmt(figures.metric(key, "p50_ms")), _fmt(echo), _fmt(matmul),
                     _fmt(None if echo is None or matmul is None else echo + matmul),
                     _x(ratios.get(replace(key, benchmark="grpc_over_floor_p50"))),
                     _fmt(figures.metric(replace(alone, benchmark="plain"), "p50_ms")),
                     _x(ratios.get(replace(key, benchmark="grpc_over_plain_p50")))])
    if not rows:
        return []
    return ["## gRPC door, 1 caller, vs the floors and plain routing in-process", "",
            *_table(["router", "dtype", "tokens", "gRPC p50 ms", "echo p50 ms", "matmul p50 ms",
                     "echo + matmul ms", "gRPC / (echo + matmul)", "plain p50 ms",
                     "gRPC / plain"], rows)]


def _inprocess_section(figures: Figures, ratios: dict[CellKey, float]) -> list[str]:
    rows = []
    for key in figures.keys("ours"):
        plain, matmul = replace(key, benchmark="plain"), replace(key, benchmark="matmul")
        rows.append([str(key.router), str(key.dtype), str(key.tokens),
                     *(_fmt(figures.metric(cell, m)) for cell in (key, plain)
                       for m in ("p50_ms", "p99_ms")),
                     _fmt(figures.metric(matmul, "p50_ms")),
                     *(_x(ratios.get(replace(key, benchmark=name))) for name in
                       ("ours_over_plain_p50", "plain_over_matmul_p50",
                        "ours_over_matmul_p50"))])
    if not rows:
        return []
    return ["## In-process: our router vs plain PyTorch routing vs the bare matmul", "",
            *_table(["router", "dtype", "tokens", "ours p50 ms", "ours p99 ms", "plain p50 ms",
                     "plain p99 ms", "matmul p50 ms", "ours / plain", "plain / matmul",
                     "ours / matmul"], rows)]


def _colocated_section(report: BenchReport, figures: Figures,
                       ratios: dict[CellKey, float]) -> list[str]:
    lines = ["## Shared-memory door vs the same calls in-process", ""]
    rows = []
    for key in figures.keys("colocated"):
        alone = replace(key, concurrency=None, benchmark="ours")
        extra = ratios.get(replace(key, benchmark="colocated_extra_us"))
        rows.append([str(key.router), str(key.dtype), str(key.tokens), str(key.concurrency),
                     *(_fmt(figures.metric(key, m)) for m in ("p50_ms", "p99_ms",
                                                               "requests_per_s")),
                     _fmt(figures.metric(alone, "p50_ms")),
                     _x(ratios.get(replace(key, benchmark="colocated_over_ours_p50"))),
                     "-" if extra is None else f"{extra:.0f}",
                     _x(ratios.get(replace(key, benchmark="colocated_over_grpc_p50")))])
    if rows:
        blocking = report.plan.colocated_blocking_client
        lines += [f"Client: `{report.plan.colocated_client}`" + (
                      f"; one caller per load-client process (1 caller): `{blocking}`"
                      if blocking else "") + ". The hidden states lie in a shared buffer "
                  "of the client (`shared_buffer`, written once per cell), which the server "
                  "reads in place.", "",
                  *_table(["router", "dtype", "tokens", "callers", "shm p50 ms", "shm p99 ms",
                           "shm req/s", "ours p50 ms", "shm / ours", "shm - ours µs",
                           "shm / gRPC"], rows)]
    else:
        lines += [f"Not measured: {report.skipped.get('colocated', 'not in this run')}", ""]
    return lines


def _malloc_section(report: BenchReport, figures: Figures,
                    ratios: dict[CellKey, float]) -> list[str]:
    ratio = ratios.get(CellKey("malloc_tuned_over_untuned"))
    if ratio is None:
        return []
    rows = []
    for label, name in (("off", "malloc_untuned"), ("on", "malloc_tuned")):
        key = figures.keys(name)[0]
        rows.append([label, *(_fmt(figures.metric(key, m))
                              for m in ("mb_per_s", "requests_per_s", "p50_ms"))])
    return ["## Large messages: glibc malloc tuning", "",
            "Echo server started without and with the glibc malloc tuning "
            "(`moe_router.config.environment.MALLOC_TUNING`), "
            f"{report.plan.malloc_message_bytes / 2**20:g} MiB each way, one call at a time:", "",
            *_table(["malloc tuning", "MB/s", "req/s", "p50 ms"], rows),
            f"Tuned / untuned throughput: **{ratio:.2f}x**", ""]


def report_to_markdown(report: BenchReport) -> str:
    """The report: header (date, command, machine, noise, method), the targets, one table per
    question, the plots drawn, and any notes."""
    figures = report.figures()
    ratios = {r.key: r.value for r in derived_ratios(figures)}
    lines = _header(report) + _targets_section(report.targets(), report.machine)
    lines += _grpc_section(figures, ratios) + _cpu_section(figures, ratios)
    lines += _floors_section(figures, ratios)
    lines += _inprocess_section(figures, ratios) + _colocated_section(report, figures, ratios)
    lines += _malloc_section(report, figures, ratios)
    if report.plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in report.plots), ""]
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    return "\n".join(lines)


def write_report(report: BenchReport, output_dir: str | Path, plots: bool = True
                 ) -> tuple[Path, Path]:
    """Draw the plots (unless ``plots`` is False), then write ``service_bench.md`` and
    ``service_bench.json`` under ``output_dir``; the PNGs lie next to them."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from moe_router.analysis.bench_plots import save_bench_plots

        figures = report.figures()
        report.plots = [p.name for p in save_bench_plots(figures, derived_ratios(figures), out)]
    md, js = out / "service_bench.md", out / "service_bench.json"
    md.write_text(report_to_markdown(report), encoding="utf-8")
    js.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
    return md, js
