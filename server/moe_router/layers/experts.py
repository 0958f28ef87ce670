"""FeedForwardExpert: the standard two-matmul MLP expert used by the layers and benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from moe_router.errors import RouterConfigurationError

__all__ = ["FeedForwardExpert"]


class FeedForwardExpert(nn.Module):
    """One expert: ``x [N, D] -> Linear(D, F) -> GELU -> Linear(F, D) -> [N, D]``.

    Costs ``2 * 2 * D * F`` FLOPs per token (two matmuls), the figure the profilers
    use with ``expert_matmuls=2``.
    """

    def __init__(self, hidden_dim: int, ffn_dim: int, use_bias: bool = True) -> None:
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("ffn_dim", ffn_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RouterConfigurationError(
                    f"{name}: must be a positive integer, got {value!r}"
                )
        self.up = nn.Linear(hidden_dim, ffn_dim, bias=use_bias)
        self.down = nn.Linear(ffn_dim, hidden_dim, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the tokens ``x`` [N, D]; returns [N, D]."""
        return self.down(nn.functional.gelu(self.up(x)))
