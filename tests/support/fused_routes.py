"""Routers the fused-op tests build, and the PyTorch path they compare the op with."""

from __future__ import annotations

import torch

from moe_router.routing import GroupedTopKRouter, RouterConfig, TopKRouter
from moe_router.routing.output import RouterOutput

__all__ = ["grouped_router", "pytorch_path", "top_k_router"]


def top_k_router(dim: int = 64, experts: int = 8, k: int = 2, seed: int = 0,
                 **options) -> TopKRouter:
    """A top-k router in eval mode, its gate drawn from ``seed``."""
    torch.manual_seed(seed)
    return TopKRouter(RouterConfig(hidden_size=dim, num_experts=experts, top_k=k,
                                   **options)).eval()


def grouped_router(experts: int = 64, groups: int = 8, kept: int = 4, k: int = 8,
                   bias: bool = True, dim: int = 32, **options) -> GroupedTopKRouter:
    """A grouped top-k router in eval mode with a random correction bias (``bias``)."""
    torch.manual_seed(experts + groups + kept + k)
    router = GroupedTopKRouter(RouterConfig(hidden_size=dim, num_experts=experts, top_k=k,
                                            n_group=groups, topk_group=kept, **options),
                               use_correction_bias=bias).eval()
    if bias:
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.randn(experts) * 0.1)
    return router


def pytorch_path(router: TopKRouter, x: torch.Tensor, **kwargs) -> RouterOutput:
    """The same router's answer through its PyTorch ops."""
    fusable, selection_fusable = router._fusable, router._selection_fusable
    router._fusable = router._selection_fusable = False
    try:
        return router(x, **kwargs)
    finally:
        router._fusable, router._selection_fusable = fusable, selection_fusable
