"""The one exception tree of moe-router, as the seed lists it.

    DynamicMoEError                  base of everything we raise on purpose
    ├── RouterConfigurationError     bad router arguments, bad config.yaml, bad weights
    ├── ComplexityEstimationError    an estimator could not score the tokens
    ├── ExpertDispatchError          expert selection failed
    ├── LoadBalancingError           load-balancing state is unusable
    ├── ValidationError              the caller's input is wrong (shape, dtype, NaN, ...)
    │   ├── NotFoundError            unknown router or layer
    │   └── AlreadyExistsError       a name the caller registers is taken (shm region)
    ├── BackendError                 the device or a serving stage failed
    │   ├── CircuitOpenError         the router's breaker is open (carries retry delay)
    │   ├── OverloadedError          queue full or rate limited (carries retry delay)
    │   ├── DrainingError            the server is shutting down
    │   └── DeadlineExceededError    the call's deadline passed before it finished
    ├── AuthenticationError          missing or wrong API key
    ├── RouterMemoryError            out of device or host memory (the seed's MemoryError,
    │                                renamed so it never shadows Python's builtin)
    ├── ConvergenceError             an iterative algorithm did not converge
    ├── ModelPatchingError           a model could not be patched with a router
    └── ProfilingError               a profiler could not measure

The gRPC edge maps each class to one status code (``moe_router.status_mapping``);
the client maps the codes back to these names.
"""

from __future__ import annotations

__all__ = [
    "DynamicMoEError",
    "RouterConfigurationError",
    "ComplexityEstimationError",
    "ExpertDispatchError",
    "LoadBalancingError",
    "ValidationError",
    "NotFoundError",
    "AlreadyExistsError",
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


class DynamicMoEError(Exception):
    """Base of every error moe-router raises on purpose."""


class RouterConfigurationError(DynamicMoEError):
    """A router's arguments, config.yaml or checkpoint are invalid."""


class ComplexityEstimationError(DynamicMoEError):
    """A complexity estimator could not score the tokens."""


class ExpertDispatchError(DynamicMoEError):
    """Expert selection failed."""


class LoadBalancingError(DynamicMoEError):
    """Load-balancing state is unusable."""


class ValidationError(DynamicMoEError):
    """The caller's input is wrong: shape, dtype, non-finite values, options."""


class NotFoundError(ValidationError):
    """The request names a router or layer that the server does not host."""


class AlreadyExistsError(ValidationError):
    """The caller registers a name (a shared-memory region) that is already registered."""


class BackendError(DynamicMoEError):
    """A serving stage or the device failed; not the caller's fault."""


class _RetryableBackendError(BackendError):
    """A backend refusal that tells the caller when to come back."""

    def __init__(self, message: str, retry_after_s: float = 0.0, reason: str = "") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class CircuitOpenError(_RetryableBackendError):
    """The router's circuit breaker is open; retry after ``retry_after_s``."""


class OverloadedError(_RetryableBackendError):
    """The queue is full or the caller is rate limited; retry after ``retry_after_s``."""


class DrainingError(_RetryableBackendError):
    """The server is draining for shutdown and takes no new calls."""


class DeadlineExceededError(BackendError):
    """The call's deadline passed before routing finished."""


class AuthenticationError(DynamicMoEError):
    """The API key is missing or wrong."""


class RouterMemoryError(DynamicMoEError):
    """Out of device or host memory (the seed's ``MemoryError``, renamed)."""


class ConvergenceError(DynamicMoEError):
    """An iterative algorithm did not converge."""


class ModelPatchingError(DynamicMoEError):
    """A model could not be patched with a router."""


class ProfilingError(DynamicMoEError):
    """A profiler could not take its measurement."""


NOT_OUR_FAULT: tuple[type[DynamicMoEError], ...] = (
    ValidationError,
    AuthenticationError,
    OverloadedError,
    DrainingError,
    CircuitOpenError,
)
"""Errors that are not a failure of the router: the caller's own mistakes (bad input,
unknown router or layer, wrong key) and load shedding (queue full, rate limited,
draining, breaker open). The breaker never counts them, nor does the error rate the
alerts judge. (Not in ``__all__``, which lists the seed's classes.)"""
