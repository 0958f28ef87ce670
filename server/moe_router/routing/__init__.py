"""Pure PyTorch routing core: no gRPC, no I/O, no globals."""

from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput, Selection
from moe_router.routing.router_config import (
    DropPolicy,
    GroupScore,
    RouterConfig,
    RoutingMethod,
    ScoringFunction,
)
from moe_router.routing.topk import TopKRouter

__all__ = [
    "DropPolicy",
    "GroupScore",
    "RouterBase",
    "RouterConfig",
    "RouterOutput",
    "RoutingMethod",
    "ScoringFunction",
    "Selection",
    "TopKRouter",
]
