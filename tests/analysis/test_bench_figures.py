"""The bench's ratios, targets, comparison and plots, on results written by hand.

Every figure here is chosen so the expected ratio can be worked out on paper; the real
pipeline (servers, client processes) is exercised in test_service_bench.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.transforms import Bbox

from moe_router.analysis.bench_compare import (
    NOISE_FLOOR,
    UNCALIBRATED_NOISE,
    Noise,
    compare_reports,
    comparison_to_text,
    estimate_noise,
)
from moe_router.analysis.bench_figures import (
    RATIOS,
    Figures,
    derived_ratios,
    median_interval,
)
from moe_router.analysis.bench_plots import PLOTS, bench_plot_figures, save_bench_plots
from moe_router.analysis.bench_targets import TARGETS, evaluate_targets
from moe_router.analysis.benchmark_results import BenchmarkResult


def _result(benchmark: str, metrics: dict[str, float], **parameters: Any) -> BenchmarkResult:
    return BenchmarkResult("service-bench", {"benchmark": benchmark, **parameters}, metrics, 0.0)


def _door(benchmark: str, tokens: int, callers: int, p50: float, rps: float, p99: float = 0.0,
          router: str = "mixtral", dtype: str = "float32", **extra: float) -> BenchmarkResult:
    return _result(benchmark, {"p50_ms": p50, "p99_ms": p99 or 2 * p50, "requests_per_s": rps,
                               **extra},
                   router=router, dtype=dtype, tokens=tokens, concurrency=callers)


def _alone(benchmark: str, tokens: int, p50: float, router: str = "mixtral",
           dtype: str = "float32") -> BenchmarkResult:
    return _result(benchmark, {"p50_ms": p50}, router=router, dtype=dtype, tokens=tokens,
                   device="cpu")


def _run() -> list[BenchmarkResult]:
    """1 and 256 tokens, 1 and 16 callers, one router, every door and peer."""
    return [
        _alone("ours", 1, 0.09), _alone("plain", 1, 0.01), _alone("matmul", 1, 0.005),
        _door("grpc", 1, 1, 1.5, 600.0), _door("echo", 1, 1, 0.5, 1800.0),
        _door("colocated", 1, 1, 0.15, 6000.0),
        _door("grpc", 1, 16, 8.0, 2000.0, server_cpu_us_per_call=360.0,
              loop_cpu_us_per_call=290.0, loop_busy=0.9),
        _door("echo", 1, 16, 4.0, 2200.0, server_cpu_us_per_call=160.0),
        _door("colocated", 1, 16, 1.0, 9000.0),
        _alone("ours", 256, 0.42), _alone("plain", 256, 0.4), _alone("matmul", 256, 0.2),
        _door("grpc", 256, 1, 6.0, 150.0), _door("echo", 256, 1, 4.8, 190.0),
        _result("malloc_untuned", {"mb_per_s": 600.0}, message_bytes=1),
        _result("malloc_tuned", {"mb_per_s": 1500.0}, message_bytes=1),
    ]


def _ratios(results: list[BenchmarkResult]) -> dict[str, float]:
    return {r.key.label(): r.value for r in derived_ratios(Figures(results))}


# --------------------------------------------------------------------- ratios
def test_every_ratio_from_hand_figures() -> None:
    found = _ratios(_run())
    expected = {
        "grpc_over_echo_p50 mixtral float32 T=1 c=1": 1.5 / 0.5,
        "grpc_over_echo_p99 mixtral float32 T=1 c=1": 3.0 / 1.0,
        "grpc_over_echo_rps mixtral float32 T=1 c=1": 600 / 1800,
        "grpc_over_floor_p50 mixtral float32 T=1 c=1": 1.5 / (0.5 + 0.005),
        "grpc_over_plain_p50 mixtral float32 T=1 c=1": 1.5 / 0.01,
        "colocated_over_grpc_p50 mixtral float32 T=1 c=1": 0.15 / 1.5,
        "colocated_over_ours_p50 mixtral float32 T=1 c=1": 0.15 / 0.09,
        "colocated_extra_us mixtral float32 T=1 c=1": (0.15 - 0.09) * 1000,
        "grpc_over_echo_p50 mixtral float32 T=1 c=16": 2.0,
        "grpc_over_echo_p99 mixtral float32 T=1 c=16": 2.0,
        "grpc_over_echo_rps mixtral float32 T=1 c=16": 2000 / 2200,
        "grpc_over_echo_cpu mixtral float32 T=1 c=16": 360 / 160,
        "grpc_scaling mixtral float32 T=1 c=16": 2000 / 600,
        "echo_scaling mixtral float32 T=1 c=16": 2200 / 1800,
        "colocated_over_grpc_p50 mixtral float32 T=1 c=16": 1.0 / 8.0,
        "ours_over_plain_p50 mixtral float32 T=1": 9.0,
        "plain_over_matmul_p50 mixtral float32 T=1": 2.0,
        "ours_over_matmul_p50 mixtral float32 T=1": 18.0,
        "grpc_over_echo_p50 mixtral float32 T=256 c=1": 6.0 / 4.8,
        "grpc_over_echo_p99 mixtral float32 T=256 c=1": 6.0 / 4.8,
        "grpc_over_echo_rps mixtral float32 T=256 c=1": 150 / 190,
        "grpc_over_floor_p50 mixtral float32 T=256 c=1": 6.0 / 5.0,
        "grpc_over_plain_p50 mixtral float32 T=256 c=1": 15.0,
        "ours_over_plain_p50 mixtral float32 T=256": 0.42 / 0.4,
        "plain_over_matmul_p50 mixtral float32 T=256": 2.0,
        "ours_over_matmul_p50 mixtral float32 T=256": 2.1,
        "malloc_tuned_over_untuned": 2.5,
    }
    assert set(found) == set(expected)
    for label, value in expected.items():
        assert found[label] == pytest.approx(value), label
    assert {label.split()[0] for label in found} == set(RATIOS)


def test_a_missing_floor_gives_no_ratio_rather_than_a_wrong_one() -> None:
    results = [r for r in _run() if r.parameters["benchmark"] not in ("echo", "ours")]
    names = {label.split()[0] for label in _ratios(results)}
    assert not names & {"grpc_over_echo_p50", "grpc_over_floor_p50", "echo_scaling",
                        "colocated_over_ours_p50", "ours_over_plain_p50"}
    assert {"grpc_scaling", "grpc_over_plain_p50", "plain_over_matmul_p50"} <= names


def test_twins_written_before_the_doors_were_named_read_as_today() -> None:
    legacy = [_door("service", 1, 1, 2.0, 500.0), _door("echo", 1, 1, 1.0, 900.0),
              _alone("eager", 1, 0.5),
              _result("malloc", {"mb_per_s": 100.0}, malloc_tuning="off"),
              _result("malloc", {"mb_per_s": 300.0}, malloc_tuning="on")]
    found = _ratios(legacy)
    assert found["grpc_over_echo_p50 mixtral float32 T=1 c=1"] == 2.0
    assert found["grpc_over_plain_p50 mixtral float32 T=1 c=1"] == 4.0
    assert found["malloc_tuned_over_untuned"] == 3.0


def test_median_interval_takes_the_binomial_ranks() -> None:
    # n = 100: ranks floor(50 - 9.8) = 40 and ceil(1 + 50 + 9.8) = 61 (1-based).
    assert median_interval([float(v) for v in range(100, 0, -1)]) == (40.0, 61.0)
    assert median_interval([3.0]) == (3.0, 3.0)
    assert median_interval([2.0, 1.0, 3.0]) == (1.0, 3.0)


# --------------------------------------------------------------------- targets
def _outcomes(results: list[BenchmarkResult], device: str = "cpu",
              skipped: dict[str, str] | None = None) -> dict[str, list[Any]]:
    figures = Figures(results)
    by_name: dict[str, list[Any]] = {}
    for o in evaluate_targets(derived_ratios(figures), figures, device, skipped or {}):
        by_name.setdefault(o.target.name, []).append(o)
    return by_name


def test_the_cpu_table_gives_each_servers_cpu_per_call_and_their_ratio() -> None:
    from moe_router.analysis.bench_plan import PRESETS
    from moe_router.analysis.bench_report import BenchReport, report_to_markdown

    machine = {"cores": 2, "cpu": "x86_64", "os": "Linux", "python": "3.11", "torch": "2",
               "grpcio": "1", "device": "cpu", "malloc_env": {}, "load_average_1m": 0.5}
    report = BenchReport("moe-router bench", "2026-12-07", machine, PRESETS["quick"],
                         results=_run())
    markdown = report_to_markdown(report)
    section = markdown.split("## Server CPU per call")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| mixtral")]
    # only the cell with CPU figures; the echo's loop was not resolved, so no parentheses
    assert rows == ["| mixtral | float32 | 1 | 16 | 360 (290, 90%) | 160 | 2.25x | - |"]


def test_targets_judge_each_case_against_its_bound() -> None:
    found = _outcomes(_run())
    assert set(found) == {t.name for t in TARGETS}
    (latency,) = found["grpc-1-token"]
    assert (latency.case, latency.measured, latency.passed) == ("mixtral float32 T=1 c=1", 3.0,
                                                                False)
    (scaling,) = found["grpc-scaling"]  # 256 tokens at 16 callers would not be a case
    assert scaling.measured == pytest.approx(2000 / 600) and scaling.passed is True
    (versus_echo,) = found["grpc-vs-echo-16"]
    assert versus_echo.measured == pytest.approx(2000 / 2200) and versus_echo.passed is True
    (floor,) = found["grpc-256"]  # exactly on the bound: 6.0 / (4.8 + 0.2) = 1.2
    assert floor.measured == pytest.approx(1.2) and floor.passed is True
    (shm,) = found["shm-1-token"]
    assert shm.measured == pytest.approx(60.0) and shm.passed is True
    (one, many) = found["ours-1-token"] + found["ours-256-up"]
    assert (one.measured, one.passed) == (pytest.approx(9.0), False)
    assert (many.measured, many.passed) == (pytest.approx(1.05), True)


def test_targets_not_measured_say_why() -> None:
    results = [r for r in _run() if r.parameters["benchmark"] != "colocated"]
    found = _outcomes(results, skipped={"colocated": "no co-located client here"})
    for name in ("shm-1-token", "shm-2048"):
        (outcome,) = found[name]
        assert outcome.measured is None and outcome.passed is None
        assert outcome.reason == "no co-located client here"
    for name in ("gpu-8192", "cuda-ipc"):
        assert found[name][0].reason == "no CUDA device on this host"
    (floor,) = _outcomes([r for r in results if r.parameters.get("tokens") != 256])["grpc-256"]
    assert "no such cell" in floor.reason


def test_the_gpu_target_reads_our_router_on_cuda_only() -> None:
    results = [_alone("ours", 8192, 0.8, router="deepseek-v3"),
               _alone("ours", 8192, 3.0, router="mixtral")]
    (outcome,) = _outcomes(results, device="cuda:0")["gpu-8192"]
    assert (outcome.case, outcome.measured, outcome.passed) == ("deepseek-v3 float32 T=8192",
                                                                0.8, True)
    assert _outcomes(results, device="cpu")["gpu-8192"][0].measured is None


# --------------------------------------------------------------------- compare
def _twin(results: list[BenchmarkResult], date: str) -> dict[str, Any]:
    return {"date": date, "command": "moe-router bench", "machine": {"load_average_1m": 1.0},
            "results": [r.to_dict() for r in results]}


def _changes(old: list[BenchmarkResult], new: list[BenchmarkResult]
             ) -> tuple[dict[tuple[str, str], Any], Noise]:
    changes, noise = compare_reports(_twin(old, "then"), _twin(new, "now"))
    return {(c.cell.label(), c.metric): c for c in changes}, noise


def _echoes(moves: list[float]) -> tuple[list[BenchmarkResult], list[BenchmarkResult]]:
    """Echo floors at 1..n tokens whose p50 moves by ``moves`` (req/s unchanged)."""
    old = [_door("echo", t, 1, 1.0, 100.0) for t in range(1, len(moves) + 1)]
    new = [_door("echo", t, 1, 1.0 + m, 100.0) for t, m in enumerate(moves, start=1)]
    return old, new


def test_the_threshold_is_how_much_the_floors_moved_between_the_two_runs() -> None:
    # 5 echo cells x (p50, req/s) = 10 floor figures: 5 unmoved, p50s by 0.02 .. 0.40.
    # Their 90th percentile (rank int(0.9 * 10) = 9 of the sorted moves) is 0.40.
    old, new = _echoes([0.02, 0.05, 0.1, 0.2, 0.4])
    old += [_door("grpc", 1, 1, 2.0, 500.0), _door("grpc", 2, 1, 2.0, 500.0)]
    new += [_door("grpc", 1, 1, 2.7, 500.0), _door("grpc", 2, 1, 3.0, 500.0)]
    changes, noise = _changes(old, new)
    assert noise.doors == pytest.approx(0.4) and noise.door_figures == 10
    assert changes[("grpc mixtral float32 T=1 c=1", "p50_ms")].verdict == ""  # +35%
    assert changes[("grpc mixtral float32 T=2 c=1", "p50_ms")].verdict == "slower"  # +50%
    assert noise.inprocess == UNCALIBRATED_NOISE and noise.inprocess_figures == 0


def test_quiet_floors_still_leave_the_minimum_threshold() -> None:
    old, new = _echoes([0.0, 0.01, 0.02])
    assert estimate_noise(Figures(old), Figures(new)).doors == NOISE_FLOOR


def test_compare_marks_only_changes_beyond_the_noise() -> None:
    old = [_door("grpc", 1, 1, 2.0, 500.0, p50_low_ms=1.9, p50_high_ms=2.1,
                 server_cpu_us_per_call=400.0),
           _door("echo", 1, 1, 1.0, 900.0, p50_low_ms=0.95, p50_high_ms=1.05),
           _alone("ours", 1, 0.1), _alone("plain", 1, 0.01),
           _door("grpc", 4, 1, 2.0, 500.0, p50_low_ms=1.0, p50_high_ms=3.0)]
    new = [_door("grpc", 1, 1, 1.0, 1000.0, p50_low_ms=0.9, p50_high_ms=1.1,  # 2x faster
                 server_cpu_us_per_call=200.0),
           _door("echo", 1, 1, 1.1, 910.0, p50_low_ms=1.0, p50_high_ms=1.2),
           _alone("ours", 1, 0.105), _alone("plain", 1, 0.01),                 # +5%
           _door("grpc", 4, 1, 2.9, 500.0, p50_low_ms=2.5, p50_high_ms=3.3)]   # +45%, overlap
    changes, noise = _changes(old, new)
    assert noise.doors == UNCALIBRATED_NOISE  # two floor figures are too few to calibrate
    grpc = changes[("grpc mixtral float32 T=1 c=1", "p50_ms")]
    assert (grpc.ratio, grpc.percent, grpc.verdict) == (0.5, -50.0, "faster")
    assert changes[("grpc mixtral float32 T=1 c=1", "requests_per_s")].verdict == "faster"
    cpu = changes[("grpc mixtral float32 T=1 c=1", "server_cpu_us_per_call")]
    assert (cpu.old, cpu.new, cpu.verdict) == (400.0, 200.0, "faster")  # half the CPU a call
    assert changes[("grpc mixtral float32 T=4 c=1", "p50_ms")].verdict == ""  # intervals meet
    assert changes[("ours mixtral float32 T=1", "p50_ms")].verdict == ""
    ratio = changes[("grpc_over_echo_p50 mixtral float32 T=1 c=1", "ratio")]
    assert ratio.old == 2.0 and ratio.new == pytest.approx(1.0 / 1.1)
    assert ratio.verdict == "faster"
    assert not any(label.startswith("grpc_over_echo_p99") for label, _ in changes)
    text = comparison_to_text(list(changes.values()), noise, _twin(old, "then"),
                              _twin(new, "now"))
    assert "Compared with then" in text and "-50.0%  faster" in text
    assert "+-30% for the doors (uncalibrated" in text
    faster = sum(c.verdict == "faster" for c in changes.values())
    assert f"{len(changes)} cells compared: {faster} faster, 0 slower" in text


def test_compare_of_a_run_with_itself_marks_nothing() -> None:
    twin = _twin(_run(), "now")
    changes, _ = compare_reports(twin, json.loads(json.dumps(twin)))
    assert changes and all(c.ratio == 1.0 and c.verdict == "" for c in changes)


# --------------------------------------------------------------------- plots
def _overlaps(a: Bbox, b: Bbox) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_plots_one_per_question_with_legends_clear_of_every_panel(tmp_path: Path) -> None:
    results = _run() + [_door("grpc", 1, 1, 1.2, 700.0, dtype="bfloat16"),
                        _door("echo", 1, 1, 0.4, 2000.0, dtype="bfloat16")]
    figures = Figures(results)
    drawn = bench_plot_figures(figures, derived_ratios(figures))
    assert set(drawn) == set(PLOTS)
    for name, fig in drawn.items():
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert panels, name
        for ax in panels:
            assert not _overlaps(box, ax.get_window_extent(renderer)), name
    paths = save_bench_plots(figures, derived_ratios(figures), tmp_path)
    assert sorted(p.name for p in paths) == sorted(PLOTS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_no_colocated_picture_without_the_door() -> None:
    results = [r for r in _run() if r.parameters["benchmark"] != "colocated"]
    figures = Figures(results)
    assert "colocated_over_inprocess.png" not in bench_plot_figures(figures,
                                                                    derived_ratios(figures))
