"""``moe-router bench``: the running gRPC service measured against its peers in one run.

For each router (Mixtral-like top-2 of 8 at D=4096, DeepSeek-V3-like grouped top-8 of
256 at D=7168), input dtype and token count it times:

- **service**: Route over loopback from separate client processes (grpc.aio, closed
  loop, 1..N concurrent calls), cache off so every call computes, batching on;
- **echo**: the transport floor, a bare grpc.aio server carrying the same bytes each way;
- **eager**: the routing a user writes in-process (``x.float() @ W.T``, softmax or the
  DeepSeek grouped selection, top-k, renormalise);
- **matmul**: the gate matmul alone, the compute floor;

and reports p50/p95/p99, requests/s, tokens/s, MB/s and the ratios service/echo,
service/eager, eager/matmul; then the glibc malloc tuning
(``moe_router.config.environment.MALLOC_TUNING``) on 16 MiB echo messages. Output: a
Markdown report printed and saved with a JSON twin.

What is measured is :mod:`~moe_router.analysis.bench_plan`; what was found and its report
are :mod:`~moe_router.analysis.bench_report`; this module runs the children and the
sweep. Child processes get this process's environment through
:func:`moe_router.config.environment.child_environment`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml

from moe_router.analysis import echo_server
from moe_router.analysis.bench_plan import (
    PRESETS,
    BenchPlan,
    BenchRouter,
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
from moe_router.analysis.load_client import (
    ListeningProcess,
    LoadClientPool,
    LoadResult,
    LoadSpec,
    python_file_command,
    route_response_bytes,
)
from moe_router.config.environment import child_environment
from moe_router.errors import ValidationError
from moe_router.routing.kinds import RoutingMethod

__all__ = ["BenchPlan", "BenchReport", "BenchRouter", "PRESETS", "WireDtype", "eager_route",
           "report_to_markdown", "run_bench", "run_from_cli", "write_report"]


# --------------------------------------------------------------------- in-process peers
def eager_route(x: torch.Tensor, weight: torch.Tensor, spec: BenchRouter,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing a user writes in plain eager PyTorch: x [T, D] -> (weights, indices) [T, k].

    Top-k: softmax of ``x.float() @ W.T``, top-k, renormalised. Grouped (DeepSeek-V3):
    sigmoid scores, selection on scores + bias [E] among the ``topk_group`` groups with the
    best top-2 sums, weights from the unbiased scores, renormalised, times the scale.
    """
    logits = x.float() @ weight.T  # [T, E]
    if spec.kind is RoutingMethod.TOP_K:
        weights, indices = logits.softmax(dim=-1).topk(spec.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), indices
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias
    grouped = choice.view(x.shape[0], spec.n_group, -1)  # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    kept = group_scores.topk(spec.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, kept, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(x.shape[0], -1)
    indices = choice.masked_fill(expert_mask == 0, float("-inf")).topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    return weights / weights.sum(dim=-1, keepdim=True) * spec.routed_scaling_factor, indices


def _time_interleaved(calls: dict[str, Callable[[], object]], min_time_s: float,
                      device: torch.device, min_calls: int = 3) -> dict[str, list[float]]:
    """Latencies (ms) of each call, taken in turns (so a noisy neighbour hits all alike)
    after one warmup each, for ``min_time_s`` in all and at least ``min_calls`` each."""
    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    latencies: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            timed(fn)
        stop = time.perf_counter() + min_time_s
        while len(latencies[next(iter(calls))]) < min_calls or time.perf_counter() < stop:
            for name, fn in calls.items():
                latencies[name].append(timed(fn))
    return latencies


def _inprocess_peers(spec: BenchRouter, dtype: WireDtype, tokens: int, plan: BenchPlan,
                     device: torch.device) -> dict[str, list[float]]:
    """Latencies (ms) of the eager routing and of the bare gate matmul."""
    gen = torch.Generator().manual_seed(tokens)
    weight = (torch.randn(spec.num_experts, spec.input_dim, generator=gen)
              / spec.input_dim ** 0.5).to(device)
    bias = (0.01 * torch.randn(spec.num_experts, generator=gen)).to(device)
    x = torch.randn(tokens, spec.input_dim, generator=gen).to(device)
    x = x.to(torch.bfloat16) if dtype is WireDtype.BFLOAT16 else x
    x32 = x.float()
    return _time_interleaved({"eager": lambda: eager_route(x, weight, spec, bias),
                              "matmul": lambda: x32 @ weight.T}, plan.inprocess_s, device)


def _load_metrics(run: LoadResult, tokens: int) -> dict[str, float]:
    lat = latency_metrics(run.latencies_ms, tokens)
    per_s = run.calls / run.span_s
    return {"p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"],
            "mean_ms": lat["mean_ms"], "requests_per_s": per_s, "tokens_per_s": per_s * tokens,
            "mb_per_s": per_s * (run.request_bytes + run.response_bytes) / 1e6,
            "calls": float(run.calls), "request_bytes": float(run.request_bytes),
            "response_bytes": float(run.response_bytes)}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Run:
    """One bench run's state: the children, the client pool, the report being filled."""

    def __init__(self, plan: BenchPlan, report: BenchReport, device: torch.device) -> None:
        self.plan, self.report, self.device = plan, report, device
        self.children: list[ListeningProcess] = []
        self.pool: LoadClientPool | None = None
        self.service_target: str | None = None
        self.echo_target = ""
        self.response_bytes: dict[tuple[str, int], int] = {}
        self.unhosted: set[str] = set()

    def start(self, target: str | None, workdir: Path) -> None:
        """Start the service (unless ``target``), the echo servers and the client pool
        together, so their start-ups overlap."""
        echo = python_file_command(echo_server.__file__)
        service = None
        if target is None:
            config = workdir / "service_bench.yaml"
            config.write_text(yaml.safe_dump(service_config(self.plan), sort_keys=False))
            service = self._spawn([sys.executable, "-m", "moe_router", "serve", "--config",
                                   str(config)], child_environment(), "the moe-router server")
        self.malloc = {tuned: self._spawn(echo, child_environment(malloc_tuning=tuned),
                                          f"echo (tuned={tuned})")
                       for tuned in (False, True)}
        main_echo = self._spawn(echo, child_environment(), "the echo server")
        self.pool = LoadClientPool(self.plan.client_procs, env=child_environment())
        self.echo_target = main_echo.wait_ready()
        try:
            self.service_target = target or service.wait_ready()  # type: ignore[union-attr]
            self._check_routers()
        except (RuntimeError, grpc.RpcError) as exc:
            self.service_target = None
            self.report.notes.append(f"service not measured: {exc}")
            _progress(f"service not measured: {exc}")

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
                                         f"{spec.input_dim}: its service rows are missing")

    def stop(self) -> None:
        """Stop the clients and every child server."""
        for child in self.children:  # signal them all first: they wind down together
            if child.proc.poll() is None:
                child.proc.terminate()
        if self.pool is not None:
            self.pool.close()
        for child in self.children:
            child.stop()

    def sweep(self) -> None:
        """In-process peers, then service and echo at each concurrency, per cell."""
        plan = self.plan
        for spec in plan.routers:
            for dtype in plan.dtypes:
                for tokens in plan.tokens:
                    self._cell(spec, dtype, tokens)

    def _cell(self, spec: BenchRouter, dtype: WireDtype, tokens: int) -> None:
        plan, report = self.plan, self.report
        base = {"router": spec.name, "dtype": dtype.value, "tokens": tokens,
                "dim": spec.input_dim}
        peers = _inprocess_peers(spec, dtype, tokens, plan, self.device)
        p50 = {}
        for kind, latencies in peers.items():
            metrics = latency_metrics(latencies, tokens)
            p50[kind] = metrics["p50_ms"]
            report.add({"benchmark": kind, **base, "device": str(self.device)},
                       {k: metrics[k] for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms",
                                                "tokens_per_s")} | {"calls": len(latencies)})
        report.add({"benchmark": "compute_ratio", **base},
                   {"eager_over_matmul": p50["eager"] / p50["matmul"]})
        _progress(f"{spec.name} {dtype.value} T={tokens}: eager p50 {p50['eager']:.3f} ms, "
                  f"matmul p50 {p50['matmul']:.3f} ms")
        for level in plan.levels(tokens):
            service = None
            if self.service_target is not None and spec.name not in self.unhosted:
                service = self._load(spec, dtype, tokens, level, "route")
            echo = self._load(spec, dtype, tokens, level, "echo")
            if service is not None and echo is not None:
                ratios = {"service_over_echo_p50": service["p50_ms"] / echo["p50_ms"],
                          "echo_over_service_throughput":
                              echo["requests_per_s"] / service["requests_per_s"]}
                if level == 1:
                    ratios["service_over_eager_p50"] = service["p50_ms"] / p50["eager"]
                report.add({"benchmark": "service_ratio", **base, "concurrency": level}, ratios)

    def _load(self, spec: BenchRouter, dtype: WireDtype, tokens: int, level: int,
              method: str) -> dict[str, float] | None:
        assert self.pool is not None
        route = method == "route"
        response = self.response_bytes.get((spec.name, tokens)) or \
            route_response_bytes(tokens, spec.top_k, spec.num_experts)
        load = LoadSpec(target=(self.service_target or "") if route else self.echo_target,
                        method="route" if route else "echo", router=spec.name, tokens=tokens,
                        dim=spec.input_dim, dtype=dtype.value, response_bytes=response)
        run = self.pool.run(load, level, self.plan.warmup_s, self.plan.duration_s)
        kind = "service" if route else "echo"
        params = {"benchmark": kind, "router": spec.name, "dtype": dtype.value, "tokens": tokens,
                  "dim": spec.input_dim, "concurrency": level}
        if run.errors:
            self.report.notes.append(f"{kind} {spec.name} {dtype.value} T={tokens} c={level}: "
                                     f"{run.errors} failed calls, first: {run.first_error}")
        if not run.calls or run.span_s <= 0:
            _progress(f"  {kind} c={level}: no successful call ({run.first_error})")
            return None
        if route:
            self.response_bytes[(spec.name, tokens)] = run.response_bytes
        metrics = _load_metrics(run, tokens)
        self.report.add(params, metrics)
        _progress(f"  {kind:<7} c={level:<3} p50 {metrics['p50_ms']:8.3f} ms  "
                  f"{metrics['requests_per_s']:9.1f} req/s  {metrics['mb_per_s']:8.1f} MB/s")
        return metrics

    def malloc_test(self) -> None:
        """Echo throughput of ``malloc_message_bytes`` each way, server with and without the
        malloc tuning, alternating rounds; reports MB/s of each and their ratio."""
        assert self.pool is not None
        plan = self.plan
        runs: dict[bool, list[LoadResult]] = {False: [], True: []}
        for _ in range(plan.malloc_rounds):
            for tuned in (False, True):
                spec = LoadSpec(target=self.malloc[tuned].wait_ready(), method="echo",
                                payload_bytes=plan.malloc_message_bytes,
                                response_bytes=plan.malloc_message_bytes)
                runs[tuned].append(self.pool.run(spec, 1, plan.warmup_s, plan.malloc_duration_s))
        mb_per_s = {}
        for tuned, parts in runs.items():
            calls = sum(p.calls for p in parts)
            seconds = sum(p.span_s for p in parts)
            if not calls or seconds <= 0:
                self.report.notes.append(f"malloc test: no successful call (tuned={tuned})")
                return
            mb_per_s[tuned] = calls * 2 * plan.malloc_message_bytes / seconds / 1e6
            latencies = [ms for p in parts for ms in p.latencies_ms]
            self.report.add({"benchmark": "malloc", "malloc_tuning": "on" if tuned else "off",
                             "message_bytes": plan.malloc_message_bytes, "concurrency": 1},
                            {"mb_per_s": mb_per_s[tuned], "requests_per_s": calls / seconds,
                             "p50_ms": latency_metrics(latencies, 1)["p50_ms"],
                             "calls": float(calls)})
        self.report.add({"benchmark": "malloc_ratio",
                         "message_bytes": plan.malloc_message_bytes},
                        {"tuned_over_untuned_throughput": mb_per_s[True] / mb_per_s[False]})
        _progress(f"malloc tuning, {plan.malloc_message_bytes >> 20} MiB echo: "
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
    run = _Run(plan, report, device)
    try:
        with tempfile.TemporaryDirectory(prefix="moe-router-bench-") as workdir:
            run.start(target, Path(workdir))
            run.sweep()
            run.malloc_test()
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        run.stop()
        report.machine["load_average_1m_end"] = load_average()
    return report


def run_from_cli(args: Any) -> int:
    """``moe-router bench``: the preset, with ``--tokens/--concurrency/--dtypes/--duration``
    overrides; prints the Markdown, writes both files; exit 130 after Ctrl-C, 2 on bad flags."""
    overrides: dict[str, Any] = {}
    for name in ("tokens", "concurrency", "dtypes"):
        if getattr(args, name, None):
            overrides[name] = tuple(getattr(args, name))
    if getattr(args, "duration", None) is not None:
        overrides["duration_s"] = args.duration
    try:
        plan = replace(PRESETS[args.preset], **overrides)
    except ValidationError as exc:
        print(f"moe-router bench: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[1:]
    command = "moe-router " + " ".join(argv) if argv[:1] == ["bench"] else \
        f"moe-router bench --preset {args.preset}"
    report = run_bench(plan, target=args.target, command=command)
    md, js = write_report(report, args.output_dir)
    print(report_to_markdown(report))
    _progress(f"wrote {md} and {js}")
    return 130 if report.interrupted else 0
