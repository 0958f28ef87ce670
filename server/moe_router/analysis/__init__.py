"""Analysis kit: routing simulation, expert placement, benchmarks and FLOP/comparison profilers."""

from moe_router.analysis.placement import (
    PlacementPlan,
    contiguous_placement,
    imbalance,
    plan_placement,
)
from moe_router.analysis.simulator import RoutingSimulator, load_balance_metrics

__all__ = [
    "PlacementPlan",
    "RoutingSimulator",
    "contiguous_placement",
    "imbalance",
    "load_balance_metrics",
    "plan_placement",
]
