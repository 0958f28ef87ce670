"""Typed client errors: every ``grpc.RpcError`` from the service becomes one of these.

    RouterError                  base; .code .details .reason .retry_after_s .metadata
    ├── InvalidArgumentError     INVALID_ARGUMENT: the request is wrong (shape, dtype, ...)
    ├── NotFoundError            NOT_FOUND: unknown router or layer
    ├── UnavailableError         UNAVAILABLE: breaker open, draining, or no connection
    ├── ResourceExhaustedError   RESOURCE_EXHAUSTED: queue full, rate limited, out of memory
    ├── DeadlineExceededError    DEADLINE_EXCEEDED: the call's deadline passed
    ├── UnauthenticatedError     UNAUTHENTICATED: missing or wrong API key
    └── InternalError            INTERNAL and every other code

The mapping is :data:`STATUS_ERRORS`, one row per ``grpc.StatusCode``, applied only in
:func:`error_from_rpc`. ``reason`` and ``retry_after_s`` come from the
``google.rpc.ErrorInfo`` / ``google.rpc.RetryInfo`` details the server attaches; reading
them needs grpcio-status, a soft dependency: without it they are None.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "RouterError",
    "InvalidArgumentError",
    "NotFoundError",
    "UnavailableError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "UnauthenticatedError",
    "InternalError",
    "STATUS_ERRORS",
    "error_from_rpc",
]


class RouterError(Exception):
    """A failed call to the router service, with its gRPC status and rich details.

    ``code``: the ``grpc.StatusCode``; ``details``: the server's message; ``reason``: the
    ErrorInfo reason (``CIRCUIT_OPEN``, ``RATE_LIMITED``, ...) or None; ``retry_after_s``:
    the RetryInfo delay in seconds or None; ``metadata``: the ErrorInfo metadata (the
    server's ``error`` class name and ``request_id`` when it sent them).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        reason: str | None = None,
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.details = details
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})
        extra = [f"reason {reason}"] if reason else []
        if retry_after_s is not None:
            extra.append(f"retry after {retry_after_s:g} s")
        suffix = f" [{', '.join(extra)}]" if extra else ""
        super().__init__(f"{code.name}: {details}{suffix}")

    @property
    def request_id(self) -> str | None:
        """The request id the server logged this failure under, when it sent one."""
        return self.metadata.get("request_id")


class InvalidArgumentError(RouterError):
    """INVALID_ARGUMENT: the request is malformed (shape, dtype, values, options)."""


class NotFoundError(RouterError):
    """NOT_FOUND: the server hosts no such router or layer."""


class UnavailableError(RouterError):
    """UNAVAILABLE: breaker open, server draining, or unreachable; retry later."""


class ResourceExhaustedError(RouterError):
    """RESOURCE_EXHAUSTED: queue full, rate limited, or out of memory; retry later or smaller."""


class DeadlineExceededError(RouterError):
    """DEADLINE_EXCEEDED: the call did not finish before its deadline."""


class UnauthenticatedError(RouterError):
    """UNAUTHENTICATED: the API key is missing or wrong."""


class InternalError(RouterError):
    """INTERNAL, or any status without a class of its own (UNKNOWN, FAILED_PRECONDITION, ...)."""


_C = grpc.StatusCode

# The one table: every grpc.StatusCode, and the class its failures raise.
STATUS_ERRORS: dict[grpc.StatusCode, type[RouterError]] = {
    _C.OK: InternalError,  # never an error in itself; here so the table is total
    _C.CANCELLED: InternalError,
    _C.UNKNOWN: InternalError,
    _C.INVALID_ARGUMENT: InvalidArgumentError,
    _C.DEADLINE_EXCEEDED: DeadlineExceededError,
    _C.NOT_FOUND: NotFoundError,
    _C.ALREADY_EXISTS: InternalError,
    _C.PERMISSION_DENIED: InternalError,
    _C.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    _C.FAILED_PRECONDITION: InternalError,
    _C.ABORTED: InternalError,
    _C.OUT_OF_RANGE: InternalError,
    _C.UNIMPLEMENTED: InternalError,
    _C.INTERNAL: InternalError,
    _C.UNAVAILABLE: UnavailableError,
    _C.DATA_LOSS: InternalError,
    _C.UNAUTHENTICATED: UnauthenticatedError,
}


def _rich_details(exc: grpc.RpcError) -> tuple[str | None, float | None, dict[str, str]]:
    """(reason, retry_after_s, metadata) from the call's google.rpc.Status, when readable."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status
    except ImportError:  # grpcio-status is optional for the client
        return None, None, {}
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):  # inconsistent or absent status details
        return None, None, {}
    if status is None:
        return None, None, {}
    reason: str | None = None
    retry_after_s: float | None = None
    metadata: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason or None
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return reason, retry_after_s, metadata


def _call_attr(exc: Any, name: str) -> Any:
    method = getattr(exc, name, None)
    return method() if callable(method) else None


def error_from_rpc(exc: grpc.RpcError) -> RouterError:
    """The typed :class:`RouterError` for a failed call (sync or ``grpc.aio``).

    Use as ``raise error_from_rpc(exc) from exc``.
    """
    code = _call_attr(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call_attr(exc, "details") or str(exc) or code.name
    reason, retry_after_s, metadata = _rich_details(exc)
    cls = STATUS_ERRORS.get(code, InternalError)
    return cls(code, details, reason=reason, retry_after_s=retry_after_s, metadata=metadata)
