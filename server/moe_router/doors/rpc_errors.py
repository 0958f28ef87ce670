"""How every gRPC handler of the server answers an error, and undecodable requests.

:func:`failure` logs an INTERNAL error with its request id and drops the tracebacks;
:func:`abort_with_error` answers with the status ``moe_router.status_mapping`` gives (code,
bounded message, ErrorInfo, RetryInfo) plus ``grpc-retry-pushback-ms`` for refusals that
say when to come back. :func:`lenient` and :func:`lenient_handler` make bytes that are not
the method's message INVALID_ARGUMENT (as Route answers them) instead of gRPC's UNKNOWN
"Unexpected DecodeError", also for the standard services (grpc.health.v1, reflection).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import grpc
from grpc_status import rpc_status

from moe_router.errors import ValidationError
from moe_router.status_mapping import status_entry_for, to_status, trailing_metadata_for

__all__ = [
    "Failure",
    "Undecodable",
    "abort_with_error",
    "decoded",
    "failure",
    "lenient",
    "lenient_handler",
    "new_request_id",
]

log = logging.getLogger("moe_router.doors.v1_service")


def new_request_id() -> str:
    """A fresh request id (16 hex digits) for a call that did not bring one: 8 random
    digits drawn per process (again in a forked child) and an 8-digit call counter, unique
    within a process without a uuid4's random draw (a syscall) per call."""
    return f"{_ID_PREFIX[0]}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


_ID_PREFIX = [secrets.token_hex(4)]
_ID_COUNTER = itertools.count()
os.register_at_fork(after_in_child=lambda: _ID_PREFIX.__setitem__(0, secrets.token_hex(4)))


class Failure(NamedTuple):
    """A call's error, kept without its traceback, and the call's request id."""

    error: BaseException
    request_id: str


def failure(exc: BaseException, request_id: str) -> Failure:
    """Log ``exc`` when it is INTERNAL (with its traceback and the request id), then keep
    it without tracebacks. A traceback holds the frames of the call, and so its request
    (8 MiB, say); the abort that answers it makes a cycle (gRPC's call state -> the abort
    -> its context, our exception -> frames -> the servicer context -> the call state)
    that only the cyclic GC frees: measured, refused calls kept 250 MiB of requests alive
    with three calls held."""
    if status_entry_for(exc).code is grpc.StatusCode.INTERNAL:
        log.error("internal error (request id %s)", request_id, exc_info=exc)
    cause: BaseException | None = exc
    while cause is not None:
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    return Failure(exc, request_id)


async def abort_with_error(context: grpc.aio.ServicerContext, answered: Failure) -> None:
    """Answer the failure with its status code, bounded message, rich details and, for a
    refusal that says when to come back, ``grpc-retry-pushback-ms`` (gRPC's retry policy
    waits that long)."""
    exc = answered.error
    status = rpc_status.to_status(to_status(exc, answered.request_id))
    await context.abort(
        status.code, status.details, (*status.trailing_metadata, *trailing_metadata_for(exc))
    )


class Undecodable:
    """What a lenient deserializer returns for bytes that are not its message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def lenient(parse: Callable[[bytes], Any], name: str) -> Callable[[bytes], Any]:
    """``parse`` (a ``FromString``) returning :class:`Undecodable` instead of raising."""

    def parse_leniently(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the caller's
            return Undecodable(f"malformed {name}: {exc}")

    return parse_leniently


def decoded(request: Any) -> Any:
    """The request, or the caller's ValidationError when its bytes were undecodable."""
    if isinstance(request, Undecodable):
        raise ValidationError(request.error)
    return request


async def _refuse(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    await abort_with_error(context, failure(ValidationError(request.error), new_request_id()))


def lenient_handler(handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
    """``handler`` (any of the four kinds, coroutine or async generator behaviours) with
    undecodable request bytes answered INVALID_ARGUMENT; ``name`` is the message's name."""
    deserializer = lenient(handler.request_deserializer, name)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            if inspect.isasyncgenfunction(stream):
                async for response in stream(request, context):
                    yield response
            else:
                await stream(request, context)  # writes its answers through the context

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    behavior = handler.stream_stream if handler.stream_stream is not None else (
        handler.stream_unary
    )

    async def checked(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            yield request

    if handler.stream_stream is not None:

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(checked(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)

    async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
