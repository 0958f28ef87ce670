"""What one ``moe-router bench`` run found, and its Markdown and JSON report.

:class:`BenchReport` holds the header facts (date, command, machine), the plan, every
result and the notes; :func:`report_to_markdown` and :func:`write_report` render it.
:mod:`moe_router.analysis.service_bench` fills it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from moe_router.analysis.bench_plan import BenchPlan
from moe_router.analysis.benchmark_results import BenchmarkResult
from moe_router.config.environment import malloc_variables

__all__ = ["BenchReport", "machine_facts", "load_average", "report_to_markdown",
           "write_report"]


@dataclass
class BenchReport:
    """Everything one run measured: header facts, results, notes, whether Ctrl-C cut it."""

    command: str
    date: str
    machine: dict[str, Any]
    plan: BenchPlan
    target: str | None = None
    results: list[BenchmarkResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False

    def add(self, parameters: dict[str, Any], metrics: dict[str, float]) -> None:
        """Append a result (figures only: every metric positive and finite)."""
        self.results.append(BenchmarkResult("service-bench", parameters, metrics, time.time()))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        plan = asdict(self.plan)
        plan["dtypes"] = [d.value for d in self.plan.dtypes]
        plan["routers"] = [{**asdict(r), "kind": r.kind.value} for r in self.plan.routers]
        return {"title": "moe-router service benchmark", "command": self.command,
                "date": self.date, "machine": self.machine, "plan": plan, "target": self.target,
                "interrupted": self.interrupted, "notes": self.notes,
                "results": [r.to_dict() for r in self.results]}


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
            "grpcio": grpc.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "malloc_env": malloc_variables()}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


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
    lines = ["# moe-router service benchmark", "",
             f"- Date: {report.date}", f"- Command: `{report.command}`",
             f"- Machine: {m['cores']} cores ({m['cpu']}), {m['os']}; Python {m['python']}, "
             f"torch {m['torch']}, grpcio {m['grpcio']}; in-process device {m['device']}, "
             f"service device {m.get('service_device', '-')}; malloc variables: {malloc}; "
             f"1-min load average {m['load_average_1m']:.2f} at start, "
             f"{m.get('load_average_1m_end', m['load_average_1m']):.2f} at end (other work on "
             f"the machine shows up in every figure)",
             f"- Method: Route over loopback {served}; clients in {plan.client_procs} "
             f"separate processes (grpc.aio, closed loop); per cell {plan.warmup_s} s warmup "
             f"+ {plan.duration_s} s timed. echo = bare grpc.aio server carrying the same "
             f"bytes each way; eager = plain PyTorch routing in-process; matmul = "
             f"`x.float() @ W.T` alone. MB/s counts request + response payload.", ""]
    if report.interrupted:
        lines += ["> Interrupted: the tables hold the measurements completed before Ctrl-C.", ""]
    return lines


def report_to_markdown(report: BenchReport) -> str:
    """The report: header (date, command, machine, method), the service-vs-echo table, the
    in-process comparison, the malloc figure and any notes."""
    found: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in report.results:
        p = r.parameters
        found[(p["benchmark"], p.get("router"), p.get("dtype"), p.get("tokens"),
               p.get("concurrency"), p.get("malloc_tuning"))] = r.metrics

    def cells(kind: str, key: tuple[Any, ...], *metrics: str) -> list[str]:
        return [_fmt(found.get((kind, *key), {}).get(metric)) for metric in metrics]

    lines = _header(report) + ["## Service over loopback vs the transport floor (echo)", ""]
    rows = []
    load_cells = (k[1:] for k in found if k[0] in ("service", "echo"))
    for router, dtype, tokens, level, _ in dict.fromkeys(load_cells):
        key = (router, dtype, tokens, level, None)
        rows.append([router, dtype, str(tokens), str(level),
                     *cells("service", key, "p50_ms", "p95_ms", "p99_ms", "requests_per_s",
                            "tokens_per_s", "mb_per_s"),
                     *cells("echo", key, "p50_ms", "mb_per_s"),
                     *cells("service_ratio", key, "service_over_echo_p50")])
    lines += _table(["router", "dtype", "tokens", "concurrency", "p50 ms", "p95 ms", "p99 ms",
                     "req/s", "tokens/s", "MB/s", "echo p50 ms", "echo MB/s",
                     "service/echo p50"], rows)
    lines += ["## Service vs in-process PyTorch (one call at a time)", ""]
    rows = []
    for kind, router, dtype, tokens, _, _ in found:
        if kind == "compute_ratio":
            one, alone = (router, dtype, tokens, 1, None), (router, dtype, tokens, None, None)
            rows.append([router, dtype, str(tokens), *cells("service", one, "p50_ms"),
                         *cells("eager", alone, "p50_ms"), *cells("matmul", alone, "p50_ms"),
                         *cells("service_ratio", one, "service_over_eager_p50"),
                         *cells("compute_ratio", alone, "eager_over_matmul")])
    lines += _table(["router", "dtype", "tokens", "service p50 ms", "eager p50 ms",
                     "matmul p50 ms", "service/eager", "eager/matmul"], rows)
    ratio = found.get(("malloc_ratio", None, None, None, None, None))
    if ratio is not None:
        lines += ["## Large messages: glibc malloc tuning", "",
                  "Echo server started without and with the glibc malloc tuning "
                  "(`moe_router.config.environment.MALLOC_TUNING`), "
                  f"{report.plan.malloc_message_bytes / 2**20:g} MiB each way, one call at a "
                  f"time:", ""]
        lines += _table(["malloc tuning", "MB/s", "req/s", "p50 ms"], [
            [t, *cells("malloc", (None, None, None, 1, t), "mb_per_s", "requests_per_s",
                       "p50_ms")] for t in ("off", "on")])
        lines += [f"Tuned / untuned throughput: **{ratio['tuned_over_untuned_throughput']:.2f}x**",
                  ""]
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    return "\n".join(lines)


def write_report(report: BenchReport, output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``service_bench.md`` and ``service_bench.json`` under ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "service_bench.md", out / "service_bench.json"
    md.write_text(report_to_markdown(report), encoding="utf-8")
    js.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
    return md, js


