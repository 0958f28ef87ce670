"""DynamicMoEBenchmark: structure of results, hand-checked statistics, interrupts, files."""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import pytest
import torch

from moe_router.analysis.benchmark import (
    BenchmarkConfig,
    BenchmarkResult,
    DynamicMoEBenchmark,
    latency_metrics,
    results_to_markdown,
    static_topk_router_factory,
)
from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import RouterConfig, TopKRouter
from moe_router.routing.dynamic import DynamicRouter

SEED_CONFIG_FIELDS = ["name", "num_runs", "warmup_runs", "batch_sizes", "sequence_lengths",
                      "hidden_dims", "num_experts_list", "min_experts_list", "max_experts_list"]


def tiny_config(**overrides) -> BenchmarkConfig:
    args = dict(name="tiny", num_runs=3, warmup_runs=1, batch_sizes=[1, 2], sequence_lengths=[4],
                hidden_dims=[16], num_experts_list=[4], min_experts_list=[1],
                max_experts_list=[2])
    args.update(overrides)
    return BenchmarkConfig(**args)


class CountingTopK(TopKRouter):
    """A real TopKRouter that counts its calls (thread-safe) and can raise Ctrl-C on call n."""

    def __init__(self, hidden_dim: int, num_experts: int, top_k: int, interrupt_at: int = 0):
        super().__init__(RouterConfig(hidden_size=hidden_dim, num_experts=num_experts,
                                      top_k=top_k))
        self.calls = 0
        self.interrupt_at = interrupt_at
        self._count_lock = threading.Lock()

    def forward(self, hidden_states, generator=None, **kwargs):
        with self._count_lock:
            self.calls += 1
            calls = self.calls
        if calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().forward(hidden_states, generator=generator, **kwargs)


def counting_factory(built: list, interrupt_at: int = 0):
    def factory(hidden_dim, num_experts, min_experts, max_experts):
        router = CountingTopK(hidden_dim, num_experts, max_experts, interrupt_at)
        built.append(router)
        return router
    return factory


def assert_finite_positive(metrics: dict, keys) -> None:
    for key in keys:
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key


def test_config_fields_match_seed_and_defaults():
    assert [f.name for f in dataclasses.fields(BenchmarkConfig)] == SEED_CONFIG_FIELDS
    config = BenchmarkConfig(name="defaults")
    assert (config.num_runs, config.warmup_runs) == (100, 10)
    assert config.batch_sizes == [1, 8, 16, 32]
    assert config.sequence_lengths == [128, 256, 512]
    assert config.router_grid() == [{"hidden_dim": 768, "num_experts": 8, "min_experts": 1,
                                     "max_experts": 4}]
    assert config.shape_grid()[0] == (1, 128) and config.shape_grid()[-1] == (32, 512)


def test_config_skips_invalid_router_combinations():
    config = tiny_config(num_experts_list=[2, 4], min_experts_list=[1, 3], max_experts_list=[2, 4])
    assert {(c["num_experts"], c["min_experts"], c["max_experts"])
            for c in config.router_grid()} == {(2, 1, 2), (4, 1, 2), (4, 1, 4), (4, 3, 4)}


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"num_runs": 0}, "num_runs"),
        ({"warmup_runs": -1}, "warmup_runs"),
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"hidden_dims": []}, "hidden_dims"),
        ({"min_experts_list": [3], "max_experts_list": [2]}, "min_experts_list"),
    ],
)
def test_config_rejects_bad_values(overrides, name):
    with pytest.raises(ValidationError, match=name):
        tiny_config(**overrides)


def test_result_round_trip_through_json():
    result = BenchmarkResult("c", {"batch_size": 2, "router": "TopKRouter"},
                             {"p50_ms": 1.5}, 123.0)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"config_name", "parameters", "metrics", "timestamp"}
    assert BenchmarkResult.from_dict(data) == result


def test_latency_metrics_hand_case():
    # numpy linear percentiles of [1..5]: p95 at position 3.8 -> 4.8, p99 at 3.96 -> 4.96.
    m = latency_metrics([1.0, 2.0, 3.0, 4.0, 5.0], tokens_per_call=10)
    assert m["mean_ms"] == 3.0 and m["p50_ms"] == 3.0
    assert m["p95_ms"] == pytest.approx(4.8) and m["p99_ms"] == pytest.approx(4.96)
    assert m["min_ms"] == 1.0 and m["max_ms"] == 5.0
    assert m["std_ms"] == pytest.approx(math.sqrt(2.0))
    assert m["tokens_per_s"] == pytest.approx(10 / 0.003)


def test_latency_benchmark_structure_static_topk(tmp_path):
    built: list = []
    bench = DynamicMoEBenchmark(tmp_path, router_factory=counting_factory(built))
    results = bench.run_latency_benchmark(tiny_config())
    assert len(results) == 2 and bench.results == results
    assert [r.parameters["num_tokens"] for r in results] == [4, 8]
    for r in results:
        assert r.config_name == "tiny" and r.parameters["benchmark"] == "latency"
        assert r.parameters["router"] == "CountingTopK"
        assert_finite_positive(r.metrics, ["mean_ms", "p50_ms", "p95_ms", "p99_ms",
                                           "tokens_per_s", "load_balance_score"])
        assert r.metrics["p50_ms"] <= r.metrics["p99_ms"] <= r.metrics["max_ms"]
        assert r.metrics["avg_experts_per_token"] == 2.0
        assert r.metrics["computational_efficiency"] == 1.0
        shares = [r.metrics[f"expert_load_{i}"] for i in range(4)]
        assert sum(shares) == pytest.approx(1.0)
    assert [router.calls for router in built] == [1 + 3, 1 + 3]  # warmup + timed


def test_default_factory_is_dynamic_router(tmp_path):
    bench = DynamicMoEBenchmark(tmp_path)
    results = bench.run_latency_benchmark(tiny_config(max_experts_list=[3]))
    for r in results:
        assert r.parameters["router"] == DynamicRouter.__name__
        assert 1.0 <= r.metrics["avg_experts_per_token"] <= 3.0
        assert 0 < r.metrics["computational_efficiency"] <= 1.0


def test_layer_target_runs_experts(tmp_path):
    bench = DynamicMoEBenchmark(tmp_path, router_factory=static_topk_router_factory,
                                target="layer", ffn_multiplier=2)
    (result, *_) = bench.run_latency_benchmark(tiny_config(batch_sizes=[2]))
    assert result.parameters["target"] == "layer"
    assert result.metrics["avg_experts_per_token"] == 2.0
    assert_finite_positive(result.metrics, ["mean_ms", "tokens_per_s"])


def test_throughput_counts_every_concurrent_call(tmp_path):
    built: list = []
    bench = DynamicMoEBenchmark(tmp_path, router_factory=counting_factory(built))
    results = bench.run_throughput_benchmark(tiny_config(batch_sizes=[2]),
                                             concurrent_requests=[1, 3])
    assert [r.parameters["concurrent_requests"] for r in results] == [1, 3]
    assert built[0].calls == 1 + 3 * 1 + 3 * 3
    for r, level in zip(results, [1, 3], strict=True):
        assert_finite_positive(r.metrics, ["requests_per_s", "tokens_per_s", "wall_s",
                                           "p99_ms"])
        assert r.metrics["requests_per_s"] * r.metrics["wall_s"] == pytest.approx(3 * level)
        assert r.metrics["tokens_per_s"] == pytest.approx(r.metrics["requests_per_s"] * 8)


def test_scaling_relative_to_smallest(tmp_path):
    bench = DynamicMoEBenchmark(tmp_path, router_factory=static_topk_router_factory)
    results = bench.run_scaling_benchmark(tiny_config(batch_sizes=[1, 4], sequence_lengths=[2]))
    assert [r.parameters["num_tokens"] for r in results] == [2, 8]
    assert results[0].metrics["relative_throughput"] == 1.0
    for r in results:
        assert r.metrics["per_token_us"] == pytest.approx(
            r.metrics["mean_ms"] * 1e3 / r.parameters["num_tokens"])


def test_interrupt_keeps_finished_results(tmp_path):
    # Shapes: 1x4 then 2x4, 4 calls each (1 warmup + 3 timed): call 6 is inside the second.
    built: list = []
    bench = DynamicMoEBenchmark(tmp_path, router_factory=counting_factory(built, 6))
    results = bench.run_scaling_benchmark(tiny_config())
    assert bench.interrupted
    assert len(results) == 1 and bench.results == results
    assert "Interrupted" in bench.generate_report()
    saved = json.loads(bench.save_results("partial.json").read_text())
    assert saved["interrupted"] is True and len(saved["results"]) == 1


def test_interrupt_in_a_worker_thread_stops_throughput(tmp_path):
    # 1 warmup call, 3 calls at level 1, then call 6 is inside level 2 (two threads).
    built: list = []
    bench = DynamicMoEBenchmark(tmp_path, router_factory=counting_factory(built, 6))
    results = bench.run_throughput_benchmark(tiny_config(batch_sizes=[1]),
                                             concurrent_requests=[1, 2])
    assert bench.interrupted
    assert [r.parameters["concurrent_requests"] for r in results] == [1]


def test_save_and_load_results(tmp_path):
    bench = DynamicMoEBenchmark(tmp_path / "out", router_factory=static_topk_router_factory)
    bench.run_latency_benchmark(tiny_config())
    path = bench.save_results()
    assert path.parent == tmp_path / "out" and path.suffix == ".json"
    assert DynamicMoEBenchmark.load_results(path) == bench.results
    absolute = bench.save_results(tmp_path / "elsewhere" / "r.json")
    assert absolute.exists() and json.loads(absolute.read_text())["interrupted"] is False


def test_report_tables(tmp_path):
    bench = DynamicMoEBenchmark(tmp_path, router_factory=static_topk_router_factory)
    config = tiny_config()
    bench.run_latency_benchmark(config)
    bench.run_throughput_benchmark(config, concurrent_requests=[1])
    report = bench.generate_report()
    assert "## latency" in report and "## throughput" in report
    assert "Setup: target=router, router=TopKRouter" in report
    header = next(line for line in report.splitlines() if line.startswith("| batch_size"))
    assert "p50_ms" in header and "tokens_per_s" in header and "expert_load_0" not in header
    table_rows = [line for line in report.splitlines() if line.startswith("| 1 ")
                  or line.startswith("| 2 ")]
    assert len(table_rows) == len(bench.results)
    assert results_to_markdown([]).endswith("No results.")


def test_save_plots_writes_pngs(tmp_path):
    bench = DynamicMoEBenchmark(tmp_path, router_factory=static_topk_router_factory)
    assert bench.save_plots() == []
    config = tiny_config()
    bench.run_latency_benchmark(config)
    bench.run_throughput_benchmark(config, concurrent_requests=[1, 2])
    paths = bench.save_plots()
    assert {p.name for p in paths} == {"latency_vs_tokens.png", "expert_load.png",
                                       "throughput_vs_concurrency.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_bad_arguments(tmp_path):
    with pytest.raises(RouterConfigurationError, match="target"):
        DynamicMoEBenchmark(tmp_path, target="gpu-magic")
    bench = DynamicMoEBenchmark(tmp_path, router_factory=lambda **kw: torch.nn.Linear(2, 2))
    with pytest.raises(RouterConfigurationError, match="router_factory"):
        bench.run_latency_benchmark(tiny_config())
    with pytest.raises(ValidationError, match="concurrent_requests"):
        bench.run_throughput_benchmark(tiny_config(), concurrent_requests=[0])


def test_progress_bar_when_asked(tmp_path, capsys):
    bench = DynamicMoEBenchmark(tmp_path, router_factory=static_topk_router_factory,
                                show_progress=True)
    bench.run_latency_benchmark(tiny_config())
    assert "latency" in capsys.readouterr().err
    quiet = DynamicMoEBenchmark(tmp_path, router_factory=static_topk_router_factory,
                                show_progress=False)
    quiet.run_latency_benchmark(tiny_config())
    assert capsys.readouterr().err == ""
