"""Analysis kit: routing simulation, expert placement, benchmarks and FLOP/comparison profilers.

Plots (``moe_router.analysis.plots``) are imported on demand so that matplotlib loads
only when a chart is drawn.
"""

from moe_router.analysis.benchmark import (
    BenchmarkConfig,
    BenchmarkTarget,
    DynamicMoEBenchmark,
    dynamic_router_factory,
    static_topk_router_factory,
)
from moe_router.analysis.benchmark_results import (
    BenchmarkResult,
    latency_metrics,
    results_to_markdown,
)
from moe_router.analysis.placement import (
    PlacementPlan,
    contiguous_placement,
    imbalance,
    plan_placement,
)
from moe_router.analysis.profilers import (
    ComparisonProfiler,
    FLOPProfiler,
    build_router_from_dict,
    routing_flops,
)
from moe_router.analysis.simulator import RoutingSimulator, load_balance_metrics

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "BenchmarkTarget",
    "ComparisonProfiler",
    "DynamicMoEBenchmark",
    "FLOPProfiler",
    "PlacementPlan",
    "RoutingSimulator",
    "build_router_from_dict",
    "contiguous_placement",
    "dynamic_router_factory",
    "imbalance",
    "latency_metrics",
    "load_balance_metrics",
    "plan_placement",
    "results_to_markdown",
    "routing_flops",
    "static_topk_router_factory",
]
