"""The seed's import path for the error classes: ``moe_router.exceptions``.

The seed's users write ``from dynamic_moe_router.exceptions import RouterConfigurationError``;
here the same names import from ``moe_router.exceptions`` and are the very classes of
:mod:`moe_router.errors` (one tree, drawn there), so ``except`` clauses written against
either module catch the same errors. The seed's ``MemoryError`` is importable by name as
:class:`~moe_router.errors.RouterMemoryError`; it is left out of ``__all__`` so that
``from moe_router.exceptions import *`` never shadows Python's builtin ``MemoryError``.
"""

from __future__ import annotations

from moe_router.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BackendError,
    CircuitOpenError,
    ComplexityEstimationError,
    ConvergenceError,
    DeadlineExceededError,
    DrainingError,
    DynamicMoEError,
    ExpertDispatchError,
    LoadBalancingError,
    ModelPatchingError,
    NotFoundError,
    OverloadedError,
    ProfilingError,
    RouterConfigurationError,
    RouterMemoryError,
    ValidationError,
)

MemoryError = RouterMemoryError  # noqa: A001 - the seed's name, by explicit import only

# The names of moe_router.errors.__all__ (a test keeps the two lists equal).
__all__ = [
    "AlreadyExistsError",
    "DynamicMoEError",
    "RouterConfigurationError",
    "ComplexityEstimationError",
    "ExpertDispatchError",
    "LoadBalancingError",
    "ValidationError",
    "NotFoundError",
    "BackendError",
    "CircuitOpenError",
    "OverloadedError",
    "DrainingError",
    "DeadlineExceededError",
    "AuthenticationError",
    "RouterMemoryError",
    "ConvergenceError",
    "ModelPatchingError",
    "ProfilingError",
]
