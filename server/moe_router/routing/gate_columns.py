"""KeptGateColumns: a router's gate weight as matmul columns, made once, not per call.

The batched gate matmul multiplies [B, rows, D] blocks by columns [1, D, E]. Two layouts
of the same numbers: the transposed view of the [E, D] weight (free), or a contiguous
[D, E] copy. On a CPU the copy is the faster operand except for tiny blocks of few
experts; measured here on one thread (bmm, µs, view -> copy):

    E = 8,   D = 4096: 1 row 3.3 -> 10.3, 4 rows 4.0 -> 6.8, 16 rows 29 -> 19
    E = 64,  D = 2048: 1 row 8.5 -> 6.4, 16 rows 88 -> 26, 256 rows 512 -> 427
    E = 128, D = 5120: 16 rows 515 -> 209;  E = 256, D = 5120: 16 rows 569 -> 378

so a CPU router keeps the copy (E x D fp32 more host memory per layer: 7.3 MB for a
DeepSeek-V3 gate) and uses it for blocks of :data:`COPY_MIN_ROWS` rows or more, or for
blocks of 2 to 7 rows when it has :data:`COPY_MIN_EXPERTS` experts or more. A block of
one row (a token routed alone, a decode step) always takes the view: one row reads the
whole gate either way, and the [E, D] rows read as dot products are at least as fast
(E = 256, D = 7168, one row: 84 -> 101 us warm with the copy, 241-313 against 300-377 us
when the gate is not in cache, as in a model's 58 layers; our DeepSeek-V3 router
in-process at 1 token went from 1.09-1.15x to 1.00-1.01x the plain PyTorch routing,
three runs each). The choice depends only on the block size and the router, so a call
routed alone and the same call merged with others (same block size,
:mod:`functional`) multiply by the same operand.
"""

from __future__ import annotations

import torch

from moe_router.routing import functional as F

__all__ = ["COPY_MIN_EXPERTS", "COPY_MIN_ROWS", "KeptGateColumns"]

COPY_MIN_ROWS = 8
"""Blocks of at least this many rows multiply by the contiguous copy (CPU)."""
COPY_MIN_EXPERTS = 32
"""Routers with at least this many experts multiply blocks of 2 rows or more by the copy
(CPU); a block of one row always takes the view."""


class KeptGateColumns:
    """The gate weight [E, D] as fp32 columns [1, D, E] (:func:`functional.gate_columns`,
    or its contiguous copy on a CPU, see the module docstring), kept between calls while
    no autograd graph is built and the weight is the same tensor at the same address and
    version: a load, an optimizer step, a new ``.data`` or a move to another device or
    dtype makes new ones. Two to three ops less per call (the transpose, the unsqueeze,
    and the cast of a non-fp32 weight). Inference tensors carry no version and are never
    kept.
    """

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        # (weight, address, version, transposed view, contiguous copy once made)
        self._kept: tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, weight: torch.Tensor, block_rows: int) -> torch.Tensor:
        """The columns to multiply blocks of ``block_rows`` rows by, for ``weight`` now."""
        if torch.is_grad_enabled() or weight.is_inference():
            return F.gate_columns(weight)
        address, version = weight.data_ptr(), weight._version
        kept = self._kept
        if not (kept is not None and kept[0] is weight and kept[1] == address
                and kept[2] == version):
            kept = self._kept = (weight, address, version, F.gate_columns(weight), None)
        if weight.device.type != "cpu" or block_rows == 1 or (
            block_rows < COPY_MIN_ROWS and weight.shape[0] < COPY_MIN_EXPERTS
        ):
            return kept[3]
        copy = kept[4]
        if copy is None:
            copy = kept[3].contiguous()
            self._kept = (*kept[:4], copy)
        return copy

    @property
    def kept(self) -> torch.Tensor | None:
        """The transposed view kept now, if any."""
        return None if self._kept is None else self._kept[3]
