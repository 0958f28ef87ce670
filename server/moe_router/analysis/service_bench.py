"""``moe-router bench``: every door of the service measured against its floors in one run.

For each router (Mixtral-like top-2 of 8 at D=4096, DeepSeek-V3-like grouped top-8 of
256 at D=7168), input dtype and token count (1, 16, 256, 2048 by default) it times,
side by side:

- **grpc**: Route through the gRPC door over loopback from separate client processes
  (closed loop, 1, 4, 16 callers), cache off so every call computes, batching on;
- **echo**: the transport floor, a bare grpc.aio server carrying the same bytes each way
  (and "echo + matmul", the floor of a call that must also do the gate matmul);
- **colocated**: Route through the shared-memory door for callers on the same host, from
  the same client processes (a client kind of :mod:`~moe_router.analysis.load_worker`;
  skipped, with its one-line reason, while ``moe_router_client`` has no such client);
- **ours**, **plain**, **matmul**: in-process, our router (the module the server hosts),
  hand-written PyTorch routing and the bare gate matmul
  (:mod:`~moe_router.analysis.inprocess_bench`);

then the glibc malloc tuning on 16 MiB echoes. A progress bar over the cells runs on
stderr. Output: the Markdown report (targets of issue 10 first) printed and saved with
its JSON twin and PNG plots of the ratios; ``--compare OLD.json`` then prints what got
faster or slower (:mod:`~moe_router.analysis.bench_compare`).

What is measured is :mod:`~moe_router.analysis.bench_plan`; what was found and its report
are :mod:`~moe_router.analysis.bench_report`; this module runs the children and the
sweep. Child processes get this process's environment through
:func:`moe_router.config.environment.child_environment`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml
from tqdm import tqdm

from moe_router.analysis import echo_server
from moe_router.analysis.bench_compare import compare_reports, comparison_to_text
from moe_router.analysis.bench_figures import median_interval
from moe_router.analysis.bench_plan import (
    PRESETS,
    BenchPlan,
    BenchRouter,
    Transport,
    WireDtype,
    service_config,
)
from moe_router.analysis.bench_report import (
    BenchReport,
    load_average,
    machine_facts,
    report_to_markdown,
    write_report,
)
from moe_router.analysis.benchmark_results import latency_metrics
from moe_router.analysis.inprocess_bench import hosted_router, run_inprocess
from moe_router.analysis.load_client import (
    ListeningProcess,
    LoadClientPool,
    LoadResult,
    LoadSpec,
    TransportUnavailable,
    python_file_command,
    route_response_bytes,
    transport_unavailable,
)
from moe_router.config.environment import child_environment
from moe_router.errors import ValidationError
from moe_router.routing.base import RouterBase

__all__ = ["BenchPlan", "BenchReport", "BenchRouter", "PRESETS", "WireDtype", "run_bench",
           "run_from_cli"]

CUDA_IPC_SKIP = "the bench has no CUDA IPC client kind yet (the co-located door's CUDA path)"


def _latency_figures(latencies_ms: list[float], tokens: int) -> dict[str, float]:
    lat = latency_metrics(latencies_ms, tokens)
    low, high = median_interval(latencies_ms)
    return {"p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"],
            "mean_ms": lat["mean_ms"], "p50_low_ms": low, "p50_high_ms": high,
            "tokens_per_s": lat["tokens_per_s"], "calls": float(len(latencies_ms))}


def _load_figures(run: LoadResult, tokens: int) -> dict[str, float]:
    per_s = run.calls / run.span_s
    figures = {**_latency_figures(run.latencies_ms, tokens), "requests_per_s": per_s,
               "tokens_per_s": per_s * tokens,
               "mb_per_s": per_s * (run.request_bytes + run.response_bytes) / 1e6,
               "request_bytes": float(run.request_bytes),
               "response_bytes": float(run.response_bytes)}
    cpu = run.server_cpu  # the server's CPU per call: what bounds req/s on a few cores
    for name, value in (("server_cpu_us_per_call", cpu and cpu.us_per_call),
                        ("loop_cpu_us_per_call", cpu and cpu.loop_us_per_call),
                        ("loop_busy", cpu and cpu.loop_busy)):
        if value:  # None: not watched, no calls or too short a window; 0: not resolved
            figures[name] = value
    return figures


class _Run:
    """One bench run's state: the children, the client pool, the bar, the report."""

    def __init__(self, plan: BenchPlan, report: BenchReport, device: torch.device) -> None:
        self.plan, self.report, self.device = plan, report, device
        self.children: list[ListeningProcess] = []
        self.pool: LoadClientPool | None = None
        self.service_target: str | None = None
        self.echo_target = ""
        self.service_pid: int | None = None  # None: a --target server, not watched
        self.echo_pid: int | None = None
        self.config_path = Path()
        self.response_bytes: dict[tuple[str, int], int] = {}
        self.unhosted: set[str] = set()
        self.doors: list[Transport] = []
        self.bar: Any = None

    # ----------------------------------------------------------------- children
    def start(self, target: str | None, workdir: Path) -> None:
        """Start the service (unless ``target``), the echo servers and the client pool
        together, so their start-ups overlap; then see which doors can be measured."""
        echo = python_file_command(echo_server.__file__)
        if self.plan.event_loop_cpu is not None:  # the floor pinned as the server is
            echo = [*echo, "--event-loop-cpu", str(self.plan.event_loop_cpu)]
        self.config_path = workdir / "service_bench.yaml"
        self.config_path.write_text(yaml.safe_dump(service_config(self.plan), sort_keys=False))
        service = None
        if target is None:
            service = self._spawn([sys.executable, "-m", "moe_router", "serve", "--config",
                                   str(self.config_path)], child_environment(),
                                  "the moe-router server")
        self.malloc = {tuned: self._spawn(echo, child_environment(malloc_tuning=tuned),
                                          f"echo (tuned={tuned})")
                       for tuned in (False, True)}
        main_echo = self._spawn(echo, child_environment(), "the echo server")
        self.echo_pid = main_echo.proc.pid
        self.service_pid = None if service is None else service.proc.pid
        self.pool = LoadClientPool(self.plan.client_procs, env=child_environment())
        self.echo_target = main_echo.wait_ready()
        try:
            self.service_target = target or service.wait_ready()  # type: ignore[union-attr]
            self._check_routers()
        except (RuntimeError, grpc.RpcError) as exc:
            self.service_target = None
            self.report.notes.append(f"service not measured: {exc}")
            self.report.skipped["grpc"] = self.report.skipped["colocated"] = \
                "the service did not start"
        self.doors = [t for t in self.plan.transports if self._door_ready(t)]
        if self.device.type == "cuda":
            self.report.skipped["cuda_ipc"] = CUDA_IPC_SKIP

    def _door_ready(self, transport: Transport) -> bool:
        if self.service_target is None:
            return False
        reason = transport_unavailable(transport.value, self.plan.colocated_client)
        if reason is not None:
            self._skip(transport, reason)
        return reason is None

    def _skip(self, transport: Transport, reason: str) -> None:
        self.report.skipped[transport.value] = reason
        self._say(f"{transport.value} door not measured: {reason}")

    def _spawn(self, command: list[str], env: dict[str, str], label: str) -> ListeningProcess:
        child = ListeningProcess(command, env, label)
        self.children.append(child)
        return child

    def _check_routers(self) -> None:
        from moe_router_client import RouterClient

        with RouterClient(self.service_target or "", timeout=30.0, retries=0) as client:
            hosted = {r.name: r for r in client.list_routers()}
            self.report.machine["service_device"] = client.health().device
        for spec in self.plan.routers:
            info = hosted.get(spec.name)
            if info is None or info.input_dim != spec.input_dim:
                self.unhosted.add(spec.name)
                self.report.notes.append(f"service has no router '{spec.name}' of dim "
                                         f"{spec.input_dim}: its door rows are missing")

    def stop(self) -> None:
        """Stop the clients and every child server, and close the bar."""
        for child in self.children:  # signal them all first: they wind down together
            if child.proc.poll() is None:
                child.proc.terminate()
        if self.pool is not None:
            self.pool.close()
        for child in self.children:
            child.stop()
        if self.bar is not None:
            self.bar.close()

    # ----------------------------------------------------------------- sweep
    def _say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def _step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def _cell_count(self) -> int:
        plan, count = self.plan, 0
        for spec in plan.routers:
            doors = 0 if spec.name in self.unhosted else len(self.doors)
            for tokens in plan.tokens:
                count += len(plan.dtypes) * (1 + len(plan.levels(tokens)) * (1 + doors)
                                             * plan.rounds)
        if self.device.type == "cuda":
            count += len(plan.routers) * len(plan.dtypes) * len(plan.gpu_tokens)
        return count + 2 * plan.malloc_rounds

    def sweep(self) -> None:
        """Per cell: the in-process peers, then the doors and the echo at each level."""
        plan = self.plan
        self.bar = tqdm(total=self._cell_count(), desc="moe-router bench", unit="cell",
                        file=sys.stderr, dynamic_ncols=True)
        for spec in plan.routers:
            router = hosted_router(spec, self.config_path, self.device)
            for dtype in plan.dtypes:
                for tokens in plan.tokens:
                    self._inprocess(spec, router, dtype, tokens)
                    for level in plan.levels(tokens):
                        self._doors(spec, dtype, tokens, level)
                if self.device.type == "cuda":
                    for tokens in plan.gpu_tokens:
                        self._inprocess(spec, router, dtype, tokens)

    def _inprocess(self, spec: BenchRouter, router: RouterBase, dtype: WireDtype,
                   tokens: int) -> None:
        base = {"router": spec.name, "dtype": dtype.value, "tokens": tokens,
                "dim": spec.input_dim, "device": str(self.device)}
        run = run_inprocess(spec, router, dtype, tokens, self.plan.inprocess_s, self.device,
                            self.plan.inprocess_threads)
        if run.disagreement is not None:
            self.report.notes.append(run.disagreement)
        p50 = {}
        for name, latencies in run.latencies.items():
            figures = _latency_figures(latencies, tokens)
            p50[name] = figures["p50_ms"]
            self.report.add({"benchmark": name, **base}, figures)
        self._say(f"{spec.name} {dtype.value} T={tokens}: " + ", ".join(
            f"{name} p50 {ms:.4f} ms" for name, ms in p50.items()))
        self._step(f"{spec.name} {dtype.value} T={tokens} in-process")

    def _doors(self, spec: BenchRouter, dtype: WireDtype, tokens: int, level: int) -> None:
        """gRPC Route, the echo of its bytes, then the other doors, taking turns for
        ``plan.rounds`` rounds; each door's rounds make one result."""
        plan = self.plan
        doors: list[tuple[str, Transport]] = [("echo", Transport.GRPC)]
        if spec.name not in self.unhosted:
            doors = [(d.value, d) for d in self.doors if d is Transport.GRPC] + doors + \
                [(d.value, d) for d in self.doors if d is not Transport.GRPC]
        parts: dict[str, list[LoadResult]] = {name: [] for name, _ in doors}
        for round_ in range(plan.rounds):
            for name, transport in doors:
                if transport not in self.doors and name != "echo":
                    continue  # found unavailable in an earlier round
                label = f"{name} {spec.name} {dtype.value} T={tokens} c={level}"
                try:
                    run = self.pool.run(  # type: ignore[union-attr]
                        self._spec(spec, dtype, tokens, name, transport), level,
                        plan.warmup_s if round_ == 0 else 0.0, plan.duration_s / plan.rounds,
                        watch_pid=self.echo_pid if name == "echo" else self.service_pid)
                except TransportUnavailable as exc:  # the workers see what we did not
                    self.doors.remove(transport)
                    self._skip(transport, str(exc))
                    continue
                finally:
                    self._step(f"{label} round {round_ + 1}/{plan.rounds}")
                if name == Transport.GRPC.value and run.response_bytes:
                    self.response_bytes[(spec.name, tokens)] = run.response_bytes
                parts[name].append(run)
        for name, transport in doors:
            if parts[name]:
                self._record(spec, dtype, tokens, level, name, transport,
                             LoadResult.merged(parts[name]))

    def _spec(self, spec: BenchRouter, dtype: WireDtype, tokens: int, name: str,
              transport: Transport) -> LoadSpec:
        route = name != "echo"
        response = self.response_bytes.get((spec.name, tokens)) or \
            route_response_bytes(tokens, spec.top_k, spec.num_experts)
        return LoadSpec(target=(self.service_target or "") if route else self.echo_target,
                        method="route" if route else "echo", router=spec.name, tokens=tokens,
                        dim=spec.input_dim, dtype=dtype.value, response_bytes=response,
                        transport=transport.value, client_class=self.plan.colocated_client,
                        blocking_client_class=self.plan.colocated_blocking_client)

    def _record(self, spec: BenchRouter, dtype: WireDtype, tokens: int, level: int, name: str,
                transport: Transport, run: LoadResult) -> None:
        label = f"{name} {spec.name} {dtype.value} T={tokens} c={level}"
        if run.errors:
            self.report.notes.append(f"{label}: {run.errors} failed calls, first: "
                                     f"{run.first_error}")
        if not run.calls or run.span_s <= 0:
            self._say(f"  {label}: no successful call ({run.first_error})")
            return
        figures = _load_figures(run, tokens)
        self.report.add({"benchmark": name, "transport": transport.value, "router": spec.name,
                         "dtype": dtype.value, "tokens": tokens, "dim": spec.input_dim,
                         "concurrency": level}, figures)
        self._say(f"  {name:<9} c={level:<3} p50 {figures['p50_ms']:8.3f} ms  "
                  f"p99 {figures['p99_ms']:8.3f} ms  {figures['requests_per_s']:9.1f} req/s")

    def malloc_test(self) -> None:
        """Echo throughput of ``malloc_message_bytes`` each way, server with and without the
        malloc tuning, alternating rounds; reports MB/s of each."""
        assert self.pool is not None
        plan = self.plan
        runs: dict[bool, list[LoadResult]] = {False: [], True: []}
        for _ in range(plan.malloc_rounds):
            for tuned in (False, True):
                spec = LoadSpec(target=self.malloc[tuned].wait_ready(), method="echo",
                                payload_bytes=plan.malloc_message_bytes,
                                response_bytes=plan.malloc_message_bytes)
                runs[tuned].append(self.pool.run(spec, 1, plan.warmup_s, plan.malloc_duration_s))
                self._step(f"malloc tuned={tuned}")
        mb_per_s = {}
        for tuned, parts in runs.items():
            calls = sum(p.calls for p in parts)
            seconds = sum(p.span_s for p in parts)
            if not calls or seconds <= 0:
                self.report.notes.append(f"malloc test: no successful call (tuned={tuned})")
                return
            mb_per_s[tuned] = calls * 2 * plan.malloc_message_bytes / seconds / 1e6
            latencies = [ms for p in parts for ms in p.latencies_ms]
            self.report.add({"benchmark": "malloc_tuned" if tuned else "malloc_untuned",
                             "message_bytes": plan.malloc_message_bytes},
                            {"mb_per_s": mb_per_s[tuned], "requests_per_s": calls / seconds,
                             "p50_ms": latency_metrics(latencies, 1)["p50_ms"],
                             "calls": float(calls)})
        self._say(f"malloc tuning, {plan.malloc_message_bytes >> 20} MiB echo: "
                  f"{mb_per_s[False]:.0f} -> {mb_per_s[True]:.0f} MB/s")


def run_bench(plan: BenchPlan, target: str | None = None, command: str = "moe-router bench"
              ) -> BenchReport:
    """Run the whole bench: start the servers (the service unless ``target`` names a running
    one) and clients, measure, stop every child. Ctrl-C ends it early with ``interrupted``
    set and the measurements so far kept."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = BenchReport(command=command,
                         date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         machine=machine_facts(device), plan=plan, target=target)
    if target is not None:
        report.notes.append("ours is built from the bench's config entry, not from the "
                            f"running server's config at {target}")
    run = _Run(plan, report, device)
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="moe-router-bench-") as workdir:
            run.start(target, Path(workdir))
            report.machine["startup_s"] = time.monotonic() - began
            run.sweep()
            run.malloc_test()
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        run.stop()
        report.machine["load_average_1m_end"] = load_average()
        report.machine["wall_s"] = time.monotonic() - began
    return report


def _read_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"--compare: cannot read {path} as a bench JSON twin: "
                              f"{exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValidationError(f"--compare: {path} is not a bench JSON twin (no 'results' "
                              f"list); expected service_bench.json of a moe-router bench run")
    return data


def run_from_cli(args: Any) -> int:
    """``moe-router bench``: the preset, with ``--tokens/--concurrency/--dtypes/--duration``
    overrides; prints the Markdown, writes the report, its JSON twin and plots; with
    ``--compare OLD.json`` prints what changed against OLD (``--compare OLD NEW`` compares
    two twins without running). Exit 130 after Ctrl-C, 2 on bad flags."""
    overrides: dict[str, Any] = {}
    for name in ("tokens", "concurrency", "dtypes"):
        if getattr(args, name, None):
            overrides[name] = tuple(getattr(args, name))
    if getattr(args, "duration", None) is not None:
        overrides["duration_s"] = args.duration
    if getattr(args, "event_loop_cpu", None) is not None:
        overrides["event_loop_cpu"] = args.event_loop_cpu
    compare = list(getattr(args, "compare", None) or [])
    try:
        plan = replace(PRESETS[args.preset], **overrides)
        if len(compare) > 2:
            raise ValidationError(f"--compare: takes OLD.json [NEW.json], got {compare}")
        old = _read_json(compare[0]) if compare else None
        new = _read_json(compare[1]) if len(compare) == 2 else None
    except ValidationError as exc:
        print(f"moe-router bench: {exc}", file=sys.stderr)
        return 2
    if old is not None and new is not None:
        print(comparison_to_text(*compare_reports(old, new), old, new))
        return 0
    argv = sys.argv[1:]
    command = "moe-router " + " ".join(argv) if argv[:1] == ["bench"] else \
        f"moe-router bench --preset {args.preset}"
    report = run_bench(plan, target=args.target, command=command)
    md, js = write_report(report, args.output_dir)
    print(report_to_markdown(report))
    print(f"wrote {md}, {js} and {len(report.plots)} plots", file=sys.stderr)
    if old is not None:
        new = report.to_dict()
        text = comparison_to_text(*compare_reports(old, new), old, new)
        (Path(args.output_dir) / "service_bench_compare.txt").write_text(text + "\n",
                                                                          encoding="utf-8")
        print(text)
    return 130 if report.interrupted else 0
