"""SparseMixerRouter: PhiMoE's top-2 with SparseMixer's deterministic inference weights."""

from __future__ import annotations

import math
from typing import Any

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import scoring
from moe_router.routing.base import RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig

__all__ = ["SparseMixerRouter"]


class SparseMixerRouter(RouterBase):
    """Top-2 routing whose weights are softmaxes over the logits near each choice.

    Shapes: T tokens, E experts.

        logits  = gate(x)                                          [T, E]
        e1, w1  = argmax, softmax over logits within 2*eps of the max (relative)
        e2, w2  = the same with e1 removed                         -> [T, 2]

    (:func:`moe_router.routing.scoring.sparsemixer_top2` has the exact masks.) This is
    the eval path of transformers' ``sparsemixer`` (``PhimoeTopKRouter``, Liu et al.
    2024, "GRIN: GRadient-INformed MoE", arXiv:2409.12136); training samples e1 and e2
    with Gumbel noise and is not served. ``sparsemixer_eps`` is PhiMoE's
    ``router_jitter_noise`` (0.01 in Phi-3.5-MoE). The weights do not sum to 1 and are
    not renormalised.
    """

    fixed_k = True

    def __init__(self, config: RouterConfig, sparsemixer_eps: float = 0.01) -> None:
        if config.top_k != 2:
            raise RouterConfigurationError(
                f"top_k: SparseMixer chooses exactly 2 experts per token, got {config.top_k}"
            )
        ok = isinstance(sparsemixer_eps, (int, float)) and not isinstance(sparsemixer_eps, bool)
        if not (ok and math.isfinite(sparsemixer_eps) and 0 <= sparsemixer_eps < 1):
            raise RouterConfigurationError(
                f"sparsemixer_eps: must be in [0, 1) (PhiMoE's router_jitter_noise), "
                f"got {sparsemixer_eps!r}"
            )
        super().__init__(config)
        self.sparsemixer_eps = float(sparsemixer_eps)

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """SparseMixer's two experts per token; indices/weights [T, 2], probs [T, E]."""
        logits = logits.float()
        indices, weights = scoring.sparsemixer_top2(logits, self.sparsemixer_eps)
        weights = weights * self.config.routed_scaling_factor
        return Selection(indices, weights, torch.softmax(logits, dim=-1), {})
