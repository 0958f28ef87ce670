"""MoE layers: a router plus real experts (nn.Modules), for in-process use and measurement."""

from moe_router.layers.dispatch import run_experts_grouped
from moe_router.layers.experts import FeedForwardExpert
from moe_router.layers.moe_layer import LayerNormMoE, MoELayer, SparseMoELayer

__all__ = [
    "FeedForwardExpert",
    "LayerNormMoE",
    "MoELayer",
    "SparseMoELayer",
    "run_experts_grouped",
]
