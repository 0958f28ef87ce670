"""`moe-router bench`: the eager peer's routing math, the plan's checks, and a real run.

The run starts a real server, echo servers and client processes with tiny routers and
sub-second cells; it checks the report's structure and that every figure is positive
and finite, never how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

from moe_router.analysis import service_bench
from moe_router.analysis.load_client import LoadClientPool, LoadSpec
from moe_router.analysis.service_bench import (
    BenchPlan,
    BenchRouter,
    eager_route,
    run_bench,
    run_from_cli,
    write_report,
)
from moe_router.errors import ValidationError
from moe_router.routing import GroupedTopKRouter, RouterConfig, RoutingMethod, TopKRouter

TINY_TOP_K = BenchRouter("mixtral", RoutingMethod.TOP_K, 64, 8, 2)
TINY_GROUPED = BenchRouter("deepseek-v3", RoutingMethod.GROUPED_TOP_K, 32, 16, 4, n_group=4,
                          topk_group=2, routed_scaling_factor=2.5)
TINY_PLAN = BenchPlan(routers=(TINY_TOP_K, TINY_GROUPED), tokens=(4,), concurrency=(1, 2),
                      warmup_s=0.05, duration_s=0.2, inprocess_s=0.02,
                      malloc_message_bytes=1 << 20, malloc_duration_s=0.2, malloc_rounds=1)


def _children_of_this_process() -> list[int]:
    me = str(os.getpid())
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{me}\n" in status:
                children.append(int(entry.name))
    return children


# --------------------------------------------------------------------- eager peer
def test_eager_top_k_by_hand() -> None:
    # logits = [1, 0, 2]: top-2 are experts 2 and 0, renormalised softmax e^2:e^1.
    x = torch.tensor([[1.0, 0.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    spec = BenchRouter("t", RoutingMethod.TOP_K, 2, 3, 2)
    weights, indices = eager_route(x, weight, spec)
    e = math.e
    assert indices.tolist() == [[2, 0]]
    torch.testing.assert_close(weights, torch.tensor([[e * e / (e * e + e), e / (e * e + e)]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_routing_matches_the_project_routers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 32, generator=gen).to(dtype)
    top_k = TopKRouter(RouterConfig(hidden_size=32, num_experts=8, top_k=2))
    spec = BenchRouter("t", RoutingMethod.TOP_K, 32, 8, 2)
    with torch.no_grad():
        top_k.gate.weight.copy_(torch.randn(8, 32, generator=gen))
        ours = top_k(x)
    weights, indices = eager_route(x, top_k.gate.weight, spec)
    assert torch.equal(indices.int(), ours.expert_indices)
    torch.testing.assert_close(weights, ours.expert_weights)

    grouped = GroupedTopKRouter(
        RouterConfig(hidden_size=32, num_experts=16, top_k=4, scoring="sigmoid", n_group=4,
                     topk_group=2, group_score="top2_sum", routed_scaling_factor=2.5),
        use_correction_bias=True)
    with torch.no_grad():
        grouped.gate.weight.copy_(torch.randn(16, 32, generator=gen))
        grouped.e_score_correction_bias.copy_(torch.randn(16, generator=gen))
        ours = grouped(x)
    spec = BenchRouter("t", RoutingMethod.GROUPED_TOP_K, 32, 16, 4, n_group=4, topk_group=2,
                      routed_scaling_factor=2.5)
    weights, indices = eager_route(x, grouped.gate.weight, spec, grouped.e_score_correction_bias)
    assert torch.equal(indices.int(), ours.expert_indices)
    torch.testing.assert_close(weights, ours.expert_weights)


# --------------------------------------------------------------------- plan
@pytest.mark.parametrize(("arguments", "named"), [
    ({"tokens": (0,)}, "tokens"),
    ({"concurrency": ()}, "concurrency"),
    ({"dtypes": ("float16",)}, "dtypes"),
    ({"duration_s": 0.0}, "duration_s"),
    ({"client_procs": 0}, "client_procs"),
])
def test_plan_names_the_bad_argument(arguments: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        BenchPlan(**arguments)


def test_bench_routers_use_the_one_kind_enum_and_only_its_two_kinds() -> None:
    assert BenchRouter("t", "grouped_top_k", 8, 4, 2).kind is RoutingMethod.GROUPED_TOP_K
    with pytest.raises(ValidationError, match="kind: the bench hosts 'grouped_top_k', "
                       "'top_k', got <RoutingMethod.SOFT_MOE: 'soft_moe'>"):
        BenchRouter("t", RoutingMethod.SOFT_MOE, 8, 4, 2)


def test_plan_runs_concurrency_only_up_to_its_token_limit() -> None:
    plan = BenchPlan(tokens=(16, 4096), concurrency=(1, 4), max_concurrent_tokens=256)
    assert plan.levels(16) == [1, 4]
    assert plan.levels(4096) == [1]


def test_cli_rejects_a_bad_override_before_starting_anything(capsys: pytest.CaptureFixture) -> None:
    args = argparse.Namespace(preset="quick", target=None, output_dir="unused", tokens=[0],
                              concurrency=None, dtypes=None, duration=None)
    assert run_from_cli(args) == 2
    assert "tokens" in capsys.readouterr().err


# --------------------------------------------------------------------- real runs
def test_echo_answers_the_asked_size_to_separate_client_processes() -> None:
    from moe_router.analysis import echo_server
    from moe_router.analysis.load_client import ListeningProcess, python_file_command

    server = ListeningProcess(python_file_command(echo_server.__file__), dict(os.environ), "echo")
    try:
        with LoadClientPool(2) as pool:
            spec = LoadSpec(server.wait_ready(), "echo", router="r", tokens=3, dim=5,
                            dtype="bfloat16", response_bytes=777)
            run = pool.run(spec, 3, 0.02, 0.1)
    finally:
        server.stop()
    assert run.errors == 0 and run.calls >= 3
    assert run.response_bytes == 777
    assert run.request_bytes > 3 * 5 * 2  # the bf16 payload plus the message around it
    assert all(ms > 0 for ms in run.latencies_ms) and run.span_s > 0


def test_quick_run_writes_a_complete_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(service_bench.PRESETS, "quick", TINY_PLAN)
    monkeypatch.setattr(sys, "argv", ["moe-router", "bench", "--preset", "quick"])
    args = argparse.Namespace(preset="quick", target=None, output_dir=str(tmp_path),
                              tokens=None, concurrency=None, dtypes=None, duration=None)
    assert run_from_cli(args) == 0

    report = json.loads((tmp_path / "service_bench.json").read_text())
    markdown = (tmp_path / "service_bench.md").read_text()
    assert capsys.readouterr().out.strip() == markdown.strip()
    assert report["command"] == "moe-router bench --preset quick"
    assert report["interrupted"] is False and report["notes"] == []
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"] == torch.__version__
    assert report["machine"]["service_device"] == "cpu"

    results = report["results"]
    for r in results:
        for name, value in r["metrics"].items():
            assert math.isfinite(value) and value > 0, (r["parameters"], name, value)
    cells = {(r["parameters"]["benchmark"], r["parameters"].get("router"),
              r["parameters"].get("dtype"), r["parameters"].get("concurrency")): r["metrics"]
             for r in results}
    for router in ("mixtral", "deepseek-v3"):
        for dtype in ("float32", "bfloat16"):
            for kind in ("eager", "matmul", "compute_ratio"):
                assert (kind, router, dtype, None) in cells
            for level in (1, 2):
                service = cells[("service", router, dtype, level)]
                echo = cells[("echo", router, dtype, level)]
                assert {"p50_ms", "p95_ms", "p99_ms", "requests_per_s", "tokens_per_s",
                        "mb_per_s"} <= set(service)
                # the floor carries the very bytes the service carried, each way
                assert echo["request_bytes"] == service["request_bytes"]
                assert echo["response_bytes"] == service["response_bytes"]
                ratios = cells[("service_ratio", router, dtype, level)]
                assert ("service_over_eager_p50" in ratios) == (level == 1)
    assert {("malloc", None, None, 1)} <= set(cells) and \
        ("malloc_ratio", None, None, None) in cells

    for heading in ("transport floor (echo)", "in-process PyTorch", "glibc malloc tuning"):
        assert heading in markdown
    assert markdown.count("| mixtral |") == 4 + 2  # 4 load rows, 2 in-process rows
    assert "Command: `moe-router bench --preset quick`" in markdown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_keeps_what_was_measured_and_stops_every_child(tmp_path: Path) -> None:
    long_plan = BenchPlan(routers=(TINY_TOP_K,), tokens=(4,), concurrency=(1,), warmup_s=0.05,
                          duration_s=30.0, inprocess_s=0.02, malloc_duration_s=30.0)
    # A process started in the background of a non-interactive shell (as CI may start
    # it) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # install it for this test, as an interactive terminal would have it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        report = run_bench(long_plan)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert report.interrupted
    assert _children_of_this_process() == []
    markdown_path, json_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["interrupted"] is True
    assert "Interrupted" in markdown_path.read_text()
