"""Pure PyTorch routing core: no gRPC, no I/O, no globals."""

from moe_router.routing.base import RouterBase
from moe_router.routing.dynamic import AdaptiveRouter, DynamicRouter, RoutingStrategy
from moe_router.routing.estimators import (
    AttentionEntropyEstimator,
    ComplexityEstimator,
    GradientNormEstimator,
    PerplexityProxyEstimator,
    ThresholdEstimator,
    get_estimator,
)
from moe_router.routing.expert_choice import ExpertChoiceRouter
from moe_router.routing.grouped import GroupedTopKRouter
from moe_router.routing.kinds import RoutingMethod
from moe_router.routing.output import RouterOutput, Selection
from moe_router.routing.router_config import (
    DropPolicy,
    GroupScore,
    RouterConfig,
    ScoringFunction,
)
from moe_router.routing.soft_moe import SoftMoERouter
from moe_router.routing.topk import TopKRouter
from moe_router.routing.zeta import Mechanism, MLPTopKRouter, MoERouter

__all__ = [
    "AdaptiveRouter",
    "AttentionEntropyEstimator",
    "ComplexityEstimator",
    "DropPolicy",
    "DynamicRouter",
    "GradientNormEstimator",
    "PerplexityProxyEstimator",
    "RoutingStrategy",
    "ThresholdEstimator",
    "get_estimator",
    "ExpertChoiceRouter",
    "GroupScore",
    "GroupedTopKRouter",
    "Mechanism",
    "MLPTopKRouter",
    "MoERouter",
    "RouterBase",
    "RouterConfig",
    "RouterOutput",
    "RoutingMethod",
    "ScoringFunction",
    "Selection",
    "SoftMoERouter",
    "TopKRouter",
]
