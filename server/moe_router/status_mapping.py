"""The one table from moe-router's error classes to gRPC status codes, applied at the edge.

Each class in :mod:`moe_router.errors` maps to a status code and a stable
``google.rpc.ErrorInfo`` reason (domain ``moe-router``); the client maps the pair back to
the same class. Lookup walks the exception's MRO, so a subclass without its own row takes
its parent's; anything that is not a ``DynamicMoEError`` is ``INTERNAL`` and its text is
not sent to the caller (the request id is, so the log line can be found).

A ``RouterConfigurationError`` raised while serving means the server's router is set up
wrong, not that the request is: ``FAILED_PRECONDITION`` (retrying will not help until the
operator fixes the config). ``RouterMemoryError`` is ``RESOURCE_EXHAUSTED``: a smaller
request may pass.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from moe_router import errors

__all__ = [
    "ERROR_DOMAIN",
    "MAX_MESSAGE_BYTES",
    "bounded_message",
    "trailing_metadata_for",
    "StatusEntry",
    "STATUS_TABLE",
    "status_entry_for",
    "status_code_for",
    "reason_for",
    "to_status",
]

ERROR_DOMAIN = "moe-router"

MAX_MESSAGE_BYTES = 1024
"""Longest status message sent, in UTF-8 bytes. The message travels twice in the
trailers (``grpc-message``, percent-encoded, and inside ``grpc-status-details-bin``), and
a client refuses trailers past its metadata limit (8 KiB by default): a message echoing a
100,000-character router name reached the caller as RESOURCE_EXHAUSTED "Stream removed"."""


class StatusEntry(NamedTuple):
    """How one error class crosses the wire: gRPC code and ErrorInfo reason."""

    code: grpc.StatusCode
    reason: str


_C = grpc.StatusCode

STATUS_TABLE: dict[type[BaseException], StatusEntry] = {
    errors.DynamicMoEError: StatusEntry(_C.INTERNAL, "INTERNAL"),
    errors.RouterConfigurationError: StatusEntry(_C.FAILED_PRECONDITION, "ROUTER_MISCONFIGURED"),
    errors.ComplexityEstimationError: StatusEntry(_C.INTERNAL, "COMPLEXITY_ESTIMATION_FAILED"),
    errors.ExpertDispatchError: StatusEntry(_C.INTERNAL, "EXPERT_DISPATCH_FAILED"),
    errors.LoadBalancingError: StatusEntry(_C.INTERNAL, "LOAD_BALANCING_FAILED"),
    errors.ValidationError: StatusEntry(_C.INVALID_ARGUMENT, "INVALID_INPUT"),
    errors.NotFoundError: StatusEntry(_C.NOT_FOUND, "NOT_FOUND"),
    errors.AlreadyExistsError: StatusEntry(_C.ALREADY_EXISTS, "ALREADY_EXISTS"),
    errors.BackendError: StatusEntry(_C.INTERNAL, "BACKEND_FAILED"),
    errors.CircuitOpenError: StatusEntry(_C.UNAVAILABLE, "CIRCUIT_OPEN"),
    # The reason of an OverloadedError is its own (QUEUE_FULL or RATE_LIMITED) when set.
    errors.OverloadedError: StatusEntry(_C.RESOURCE_EXHAUSTED, "OVERLOADED"),
    errors.DrainingError: StatusEntry(_C.UNAVAILABLE, "DRAINING"),
    errors.DeadlineExceededError: StatusEntry(_C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    errors.AuthenticationError: StatusEntry(_C.UNAUTHENTICATED, "UNAUTHENTICATED"),
    errors.RouterMemoryError: StatusEntry(_C.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
    errors.ConvergenceError: StatusEntry(_C.INTERNAL, "CONVERGENCE_FAILED"),
    errors.ModelPatchingError: StatusEntry(_C.INTERNAL, "MODEL_PATCHING_FAILED"),
    errors.ProfilingError: StatusEntry(_C.INTERNAL, "PROFILING_FAILED"),
}

_UNEXPECTED = StatusEntry(_C.INTERNAL, "INTERNAL")


def status_entry_for(exc: BaseException) -> StatusEntry:
    """The row of the most specific class of ``exc`` in :data:`STATUS_TABLE`."""
    for cls in type(exc).__mro__:
        entry = STATUS_TABLE.get(cls)
        if entry is not None:
            reason = getattr(exc, "reason", "") or entry.reason
            return StatusEntry(entry.code, reason)
    return _UNEXPECTED


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code an exception becomes at the edge."""
    return status_entry_for(exc).code


def reason_for(exc: BaseException) -> str:
    """The ErrorInfo reason an exception carries (e.g. ``CIRCUIT_OPEN``, ``RATE_LIMITED``)."""
    return status_entry_for(exc).reason


def bounded_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut in its middle to at most ``limit`` UTF-8 bytes: its start (what
    was wrong) and its end (what was expected) stay, the echoed middle goes."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return message
    keep = limit - 40  # room for the marker
    head = encoded[: keep * 2 // 3].decode("utf-8", "ignore")
    tail = encoded[len(encoded) - keep // 3 :].decode("utf-8", "ignore")
    cut = len(encoded) - len(head.encode()) - len(tail.encode())
    return f"{head} ... [{cut} bytes cut] ... {tail}"


_MIN_PUSHBACK_MS = 5  # grpcio 1.85's retry waited for the deadline on a pushback of 0 ms


def trailing_metadata_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """``grpc-retry-pushback-ms`` for a refusal that says when to come back: gRPC's
    retry policy (the client retries UNAVAILABLE) then waits exactly that long instead
    of its own backoff (at least 5 ms: measured, a pushback of 0 made the retried call
    hang until its deadline)."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    milliseconds = max(_MIN_PUSHBACK_MS, int(max(0.0, float(retry_after_s)) * 1000))
    return (("grpc-retry-pushback-ms", str(milliseconds)),)


def to_status(exc: BaseException, request_id: str = "") -> status_pb2.Status:
    """A rich ``google.rpc.Status`` for ``exc``: code, message, ErrorInfo and RetryInfo.

    The handler aborts with it:
    ``await context.abort_with_status(rpc_status.to_status(to_status(exc, rid)))``.
    Errors we raise on purpose send their message, cut to :data:`MAX_MESSAGE_BYTES`;
    unexpected exceptions send only "internal error" and the request id (their text stays
    in the server log).
    """
    entry = status_entry_for(exc)
    ours = isinstance(exc, errors.DynamicMoEError)
    message = (str(exc) or type(exc).__name__) if ours else "internal error"
    metadata = {"error": type(exc).__name__} if ours else {}
    if request_id:
        message = f"{bounded_message(message)} (request id {request_id})"
        metadata["request_id"] = request_id
    status = status_pb2.Status(code=_code_number(entry.code), message=bounded_message(message))
    info = error_details_pb2.ErrorInfo(reason=entry.reason, domain=ERROR_DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(0.0, float(retry_after_s)) * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def _code_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a grpc.StatusCode (``StatusCode.value`` is (int, str))."""
    return int(code.value[0])
