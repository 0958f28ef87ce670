"""The seed's benchmark suite: latency, concurrent throughput and scaling of in-process routers.

Every figure is a wall-clock measurement with ``time.perf_counter`` around one forward
call, after warmup, under ``torch.no_grad`` (and a device synchronise on CUDA). Results
are :class:`~moe_router.analysis.benchmark_results.BenchmarkResult` records, shared with
the ``moe-router bench`` service benchmark, as is the report
(:func:`~moe_router.analysis.benchmark_results.results_to_markdown`); both are
importable from here too, as the seed had them.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from moe_router.analysis.benchmark_results import (
    BenchmarkResult,
    latency_metrics,
    results_to_markdown,
)
from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.layers import FeedForwardExpert, MoELayer
from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "BenchmarkTarget",
    "DynamicMoEBenchmark",
    "RouterFactory",
    "dynamic_router_factory",
    "latency_metrics",
    "results_to_markdown",
    "static_topk_router_factory",
]

RouterFactory = Callable[..., RouterBase]
"""Builds a router: ``factory(hidden_dim=, num_experts=, min_experts=, max_experts=)``."""


def dynamic_router_factory(
    hidden_dim: int, num_experts: int, min_experts: int, max_experts: int
) -> RouterBase:
    """The default: a seed ``DynamicRouter`` with its default estimator."""
    from moe_router.routing.dynamic import DynamicRouter

    return DynamicRouter(input_dim=hidden_dim, num_experts=num_experts,
                         min_experts=min_experts, max_experts=max_experts)


def static_topk_router_factory(
    hidden_dim: int, num_experts: int, min_experts: int, max_experts: int
) -> RouterBase:
    """The static baseline: ``TopKRouter`` with k = ``max_experts`` (``min_experts`` unused)."""
    from moe_router.routing import RouterConfig, TopKRouter

    return TopKRouter(RouterConfig(hidden_size=hidden_dim, num_experts=num_experts,
                                   top_k=max_experts))


class BenchmarkTarget(str, Enum):
    """What one timed call runs: the router alone, or a full MoELayer (router + experts)."""

    ROUTER = "router"
    LAYER = "layer"


def _int_list(value: Sequence[int], name: str) -> list[int]:
    values = list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValidationError(f"{name}: must be a non-empty list of positive integers, "
                              f"got {value!r}")
    return values


@dataclass
class BenchmarkConfig:
    """Configuration for benchmark runs (the seed's fields; ``None`` lists take defaults).

    name: label carried into every result. num_runs / warmup_runs: timed and untimed
    calls per measurement. The lists span the grid: batch_sizes [1, 8, 16, 32],
    sequence_lengths [128, 256, 512], hidden_dims [768], num_experts_list [8],
    min_experts_list [1], max_experts_list [4] by default; router combinations with
    min > max or max > num_experts are skipped.
    """

    name: str
    num_runs: int = 100
    warmup_runs: int = 10
    batch_sizes: list[int] = None  # type: ignore[assignment]
    sequence_lengths: list[int] = None  # type: ignore[assignment]
    hidden_dims: list[int] = None  # type: ignore[assignment]
    num_experts_list: list[int] = None  # type: ignore[assignment]
    min_experts_list: list[int] = None  # type: ignore[assignment]
    max_experts_list: list[int] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValidationError(f"name: must be a non-empty string, got {self.name!r}")
        if isinstance(self.num_runs, bool) or not isinstance(self.num_runs, int) \
                or self.num_runs < 1:
            raise ValidationError(f"num_runs: must be an integer >= 1, got {self.num_runs!r}")
        if isinstance(self.warmup_runs, bool) or not isinstance(self.warmup_runs, int) \
                or self.warmup_runs < 0:
            raise ValidationError(
                f"warmup_runs: must be an integer >= 0, got {self.warmup_runs!r}"
            )
        defaults = {
            "batch_sizes": [1, 8, 16, 32],
            "sequence_lengths": [128, 256, 512],
            "hidden_dims": [768],
            "num_experts_list": [8],
            "min_experts_list": [1],
            "max_experts_list": [4],
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            setattr(self, name, list(default) if value is None else _int_list(value, name))
        if not self.router_grid():
            raise ValidationError(
                "min_experts_list / max_experts_list: no combination with "
                "min_experts <= max_experts <= num_experts"
            )

    def shape_grid(self) -> list[tuple[int, int]]:
        """Every (batch_size, seq_len), smallest token count first."""
        shapes = itertools.product(self.batch_sizes, self.sequence_lengths)
        return sorted(shapes, key=lambda s: (s[0] * s[1], s))

    def router_grid(self) -> list[dict[str, int]]:
        """Every valid (hidden_dim, num_experts, min_experts, max_experts) combination."""
        grid = itertools.product(self.hidden_dims, self.num_experts_list,
                                 self.min_experts_list, self.max_experts_list)
        return [
            {"hidden_dim": d, "num_experts": e, "min_experts": lo, "max_experts": hi}
            for d, e, lo, hi in grid
            if lo <= hi <= e
        ]


_Emit = Callable[["BenchmarkResult"], None]


class _Measurement(NamedTuple):
    latencies_ms: list[float]
    tokens_per_expert: torch.Tensor  # [E] summed over the timed calls
    tokens: int  # over the timed calls


def _routing_metrics(m: _Measurement, k_max: int) -> dict[str, float]:
    counts = m.tokens_per_expert.double()
    assignments = float(counts.sum())
    avg_k = assignments / m.tokens if m.tokens else 0.0
    metrics = {
        "avg_experts_per_token": avg_k,
        "computational_efficiency": avg_k / k_max,
        "load_balance_score": F.load_balance_score(counts),
        "expert_load_max_mean": float(counts.max() / counts.mean()) if assignments else 1.0,
    }
    share = counts / assignments if assignments else counts
    metrics.update({f"expert_load_{i}": float(s) for i, s in enumerate(share.tolist())})
    return metrics


class DynamicMoEBenchmark:
    """Benchmark suite for dynamic MoE routing, run in-process.

    output_dir: where :meth:`save_results` and :meth:`save_plots` write (created then).
    router_factory: builds each router (default :func:`dynamic_router_factory`, the seed's
        DynamicRouter; :func:`static_topk_router_factory` is the static baseline).
    target: time the router alone (default) or a :class:`MoELayer` with
        FeedForwardExpert(D, ffn_multiplier * D) experts.
    device: where routers and inputs live. show_progress: tqdm bars (default: when
        stderr is a terminal). Ctrl-C stops a run cleanly: completed measurements are kept
        and :attr:`interrupted` is set.
    """

    def __init__(
        self,
        output_dir: str | Path = "benchmark_results",
        router_factory: RouterFactory | None = None,
        target: BenchmarkTarget | str = BenchmarkTarget.ROUTER,
        device: str | torch.device = "cpu",
        seed: int = 0,
        ffn_multiplier: int = 4,
        show_progress: bool | None = None,
    ) -> None:
        try:
            self.target = BenchmarkTarget(target)
        except ValueError:
            allowed = ", ".join(repr(t.value) for t in BenchmarkTarget)
            raise RouterConfigurationError(
                f"target: must be one of {allowed}, got {target!r}"
            ) from None
        if router_factory is not None and not callable(router_factory):
            raise RouterConfigurationError(
                f"router_factory: must be callable, got {router_factory!r}"
            )
        if isinstance(ffn_multiplier, bool) or not isinstance(ffn_multiplier, int) \
                or ffn_multiplier < 1:
            raise RouterConfigurationError(
                f"ffn_multiplier: must be a positive integer, got {ffn_multiplier!r}"
            )
        self.output_dir = Path(output_dir)
        self.router_factory = router_factory or dynamic_router_factory
        self.device = torch.device(device)
        self.seed = int(seed)
        self.ffn_multiplier = ffn_multiplier
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.results: list[BenchmarkResult] = []
        self.interrupted = False

    # ----------------------------------------------------------------- building blocks
    def _build(self, combo: dict[str, int]) -> tuple[nn.Module, RouterBase]:
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left as it was
            torch.manual_seed(self.seed)
            router = self.router_factory(**combo)
            if not isinstance(router, RouterBase):
                raise RouterConfigurationError(
                    f"router_factory: must return a RouterBase, got {type(router).__name__}"
                )
            module: nn.Module = router
            if self.target is BenchmarkTarget.LAYER:
                dim, ffn = combo["hidden_dim"], self.ffn_multiplier * combo["hidden_dim"]
                module = MoELayer(router, lambda: FeedForwardExpert(dim, ffn), router.num_experts)
        return module.to(self.device).eval(), router

    def _input(self, batch: int, seq: int, dim: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7919 * batch + seq)
        return torch.randn(batch, seq, dim, generator=gen).to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _call(self, module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One timed forward: (latency ms, tokens_per_expert [E])."""
        self._sync()
        start = time.perf_counter()
        if isinstance(module, MoELayer):
            _, info = module(x, return_router_logits=True)
            counts = info["tokens_per_expert"]
        else:
            out: RouterOutput = module(x)
            counts = out.tokens_per_expert
        self._sync()
        return (time.perf_counter() - start) * 1e3, counts

    @torch.no_grad()
    def _measure(self, module: nn.Module, x: torch.Tensor, runs: int, warmup: int,
                 stop: threading.Event | None = None) -> _Measurement:
        for _ in range(warmup):
            self._call(module, x)
        latencies: list[float] = []
        total: torch.Tensor | None = None
        for _ in range(runs):
            if stop is not None and stop.is_set():
                break
            ms, counts = self._call(module, x)
            latencies.append(ms)
            total = counts.detach().clone() if total is None else total + counts
        tokens = len(latencies) * x.shape[0] * x.shape[1]
        counts_total = torch.zeros(0, dtype=torch.int64) if total is None else total.cpu()
        return _Measurement(latencies, counts_total, tokens)

    def _parameters(self, kind: str, combo: dict[str, int], router: RouterBase,
                    batch: int, seq: int) -> dict[str, Any]:
        return {"benchmark": kind, "target": self.target.value, "router": type(router).__name__,
                **combo, "batch_size": batch, "seq_len": seq, "num_tokens": batch * seq,
                "device": str(self.device)}

    def _run_units(self, description: str, units: list[Any],
                   body: Callable[[Any, Callable[[BenchmarkResult], None]], None]
                   ) -> list[BenchmarkResult]:
        """Run ``body(unit, emit)`` per unit with a progress bar; every emitted result is
        kept, so Ctrl-C loses only the measurement in flight."""
        produced: list[BenchmarkResult] = []

        def emit(result: BenchmarkResult) -> None:
            produced.append(result)
            self.results.append(result)

        from tqdm import tqdm  # the bench extra; imported here so the server needs no tqdm

        bar = tqdm(units, desc=description, disable=not self.show_progress, leave=False)
        try:
            for unit in bar:
                body(unit, emit)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            bar.close()
        return produced

    # ----------------------------------------------------------------- benchmarks
    def run_latency_benchmark(self, config: BenchmarkConfig) -> list[BenchmarkResult]:
        """Per-call latency (p50/p95/p99/mean ms) and tokens/s for every grid point."""
        units = [(c, s) for c in config.router_grid() for s in config.shape_grid()]

        def body(unit: tuple[dict[str, int], tuple[int, int]], emit: _Emit) -> None:
            combo, (batch, seq) = unit
            module, router = self._build(combo)
            x = self._input(batch, seq, combo["hidden_dim"])
            m = self._measure(module, x, config.num_runs, config.warmup_runs)
            metrics = {**latency_metrics(m.latencies_ms, batch * seq),
                       **_routing_metrics(m, router.k_range[1])}
            params = self._parameters("latency", combo, router, batch, seq)
            emit(BenchmarkResult(config.name, params, metrics, time.time()))

        return self._run_units("latency", units, body)

    def run_throughput_benchmark(
        self, config: BenchmarkConfig, concurrent_requests: Sequence[int] | None = None
    ) -> list[BenchmarkResult]:
        """Throughput with N concurrent in-process callers (threads sharing one router).

        Each of the N callers makes ``num_runs`` calls; requests/s and tokens/s are total
        calls and tokens over the wall time of the whole level.
        """
        levels = _int_list([1, 2, 4, 8] if concurrent_requests is None else concurrent_requests,
                           "concurrent_requests")
        units = [(c, s) for c in config.router_grid() for s in config.shape_grid()]

        def body(unit: tuple[dict[str, int], tuple[int, int]], emit: _Emit) -> None:
            combo, (batch, seq) = unit
            module, router = self._build(combo)
            x = self._input(batch, seq, combo["hidden_dim"])
            self._measure(module, x, 0, config.warmup_runs)
            for level in levels:
                metrics = self._concurrent(module, x, level, config.num_runs, router.k_range[1])
                params = self._parameters("throughput", combo, router, batch, seq)
                params["concurrent_requests"] = level
                emit(BenchmarkResult(config.name, params, metrics, time.time()))

        return self._run_units("throughput", units, body)

    def _concurrent(self, module: nn.Module, x: torch.Tensor, level: int, runs: int,
                    k_max: int) -> dict[str, float]:
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=level, thread_name_prefix="moe-bench")
        start = time.perf_counter()
        try:
            futures = [pool.submit(self._measure, module, x, runs, 0, stop)
                       for _ in range(level)]
            parts = [f.result() for f in futures]
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        wall = time.perf_counter() - start
        latencies = [ms for p in parts for ms in p.latencies_ms]
        merged = _Measurement(latencies, sum(p.tokens_per_expert for p in parts),  # type: ignore[arg-type]
                              sum(p.tokens for p in parts))
        tokens = x.shape[0] * x.shape[1]
        metrics = latency_metrics(latencies, tokens)
        metrics["tokens_per_s"] = merged.tokens / wall
        metrics["requests_per_s"] = len(latencies) / wall
        metrics["wall_s"] = wall
        metrics.update(_routing_metrics(merged, k_max))
        return metrics

    def run_scaling_benchmark(self, config: BenchmarkConfig) -> list[BenchmarkResult]:
        """Tokens/s as batch and sequence grow; ``relative_throughput`` is against the
        smallest token count of the same router, ``per_token_us`` the mean cost per token."""

        def body(combo: dict[str, int], emit: _Emit) -> None:
            module, router = self._build(combo)
            base: float | None = None
            for batch, seq in config.shape_grid():
                x = self._input(batch, seq, combo["hidden_dim"])
                m = self._measure(module, x, config.num_runs, config.warmup_runs)
                metrics = latency_metrics(m.latencies_ms, batch * seq)
                base = metrics["tokens_per_s"] if base is None else base
                metrics["relative_throughput"] = metrics["tokens_per_s"] / base
                metrics["per_token_us"] = metrics["mean_ms"] * 1e3 / (batch * seq)
                metrics.update(_routing_metrics(m, router.k_range[1]))
                params = self._parameters("scaling", combo, router, batch, seq)
                emit(BenchmarkResult(config.name, params, metrics, time.time()))

        return self._run_units("scaling", config.router_grid(), body)

    # ----------------------------------------------------------------- output
    def save_results(self, filename: str | Path | None = None) -> Path:
        """Write every result so far as JSON under ``output_dir`` (or to an absolute path)."""
        name = Path(filename or time.strftime("benchmark_results_%Y%m%d-%H%M%S.json"))
        path = name if name.is_absolute() else self.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"interrupted": self.interrupted,
                   "results": [r.to_dict() for r in self.results]}
        path.write_text(json.dumps(payload, indent=2, allow_nan=False), encoding="utf-8")
        return path

    @staticmethod
    def load_results(path: str | Path) -> list[BenchmarkResult]:
        """Read results written by :meth:`save_results`."""
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        return [BenchmarkResult.from_dict(r) for r in payload["results"]]

    def generate_report(self) -> str:
        """A Markdown summary: one table per benchmark kind."""
        return results_to_markdown(self.results, title="Dynamic MoE benchmark report",
                                   interrupted=self.interrupted)

    def save_plots(self) -> list[Path]:
        """PNG charts under ``output_dir`` (latency vs tokens, per-expert load, throughput)."""
        from moe_router.analysis.plots import save_benchmark_plots

        return save_benchmark_plots(self.results, self.output_dir)
