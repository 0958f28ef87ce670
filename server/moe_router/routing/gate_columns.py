"""KeptGateColumns: a router's gate weight as matmul columns, made once, not per call."""

from __future__ import annotations

import torch

from moe_router.routing import functional as F

__all__ = ["KeptGateColumns"]


class KeptGateColumns:
    """The gate weight [E, D] as fp32 columns [1, D, E] (:func:`functional.gate_columns`),
    kept between calls while no autograd graph is built and the weight is the same
    tensor at the same address and version: a load, an optimizer step, a new ``.data``
    or a move to another device or dtype makes new ones. Two to three ops less per call
    (the transpose, the unsqueeze, and the cast of a non-fp32 weight), a tenth of a
    1-token call. Inference tensors carry no version and are never kept.
    """

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: tuple[torch.Tensor, int, int, torch.Tensor] | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """The columns of ``weight`` now."""
        if torch.is_grad_enabled() or weight.is_inference():
            return F.gate_columns(weight)
        address, version = weight.data_ptr(), weight._version
        kept = self._kept
        if kept is not None and kept[0] is weight and kept[1] == address and kept[2] == version:
            return kept[3]
        columns = F.gate_columns(weight)
        self._kept = (weight, address, version, columns)
        return columns

    @property
    def kept(self) -> torch.Tensor | None:
        """The columns kept now, if any."""
        return None if self._kept is None else self._kept[3]
