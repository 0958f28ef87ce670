"""Transport security: API-key authentication as a gRPC server interceptor, and TLS credentials.

Every RPC except health checks and reflection must carry ``authorization: Bearer <key>``
or ``x-api-key: <key>`` metadata. Keys are compared in constant time (SHA-256 digests
with ``hmac.compare_digest`` against every configured key) and never logged. A refused
call ends with UNAUTHENTICATED and a message naming the metadata expected, never a key.

Caller identity: an accepted call runs its handler with :data:`CALLER_KEY_ID` set to the
key's id, the first 8 hex digits of its SHA-256 (short, stable, not reversible). The
service reads it with :func:`caller_identity` for rate limiting (``RouteCall.peer``),
falling back to ``context.peer()`` when it is empty (no key configured, or an exempt RPC).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc

from moe_router.errors import RouterConfigurationError

__all__ = [
    "CALLER_KEY_ID",
    "DEFAULT_EXEMPT_METHODS",
    "ApiKeyInterceptor",
    "caller_identity",
    "key_id",
    "server_credentials",
]

#: The key id of the caller whose handler is running ("" when none).
CALLER_KEY_ID: ContextVar[str] = ContextVar("moe_router_caller_key_id", default="")

#: Methods that never need a key: load balancers and tools call them unauthenticated.
DEFAULT_EXEMPT_METHODS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    # Our own Health RPC answers load balancers and probes too; it routes nothing.
    "/moe_router.v1.RouterService/Health",
    # The Open Inference Protocol's liveness and readiness probes; they name no model.
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)

_EXPECTED = "send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"


def caller_identity() -> str:
    """The authenticated caller's key id inside a handler, "" when there is none."""
    return CALLER_KEY_ID.get()


def key_id(key: str) -> str:
    """Short non-reversible id of an API key: first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every RPC outside ``exempt_methods`` that lacks a configured API key."""

    def __init__(
        self, keys: Sequence[str], exempt_methods: Iterable[str] = DEFAULT_EXEMPT_METHODS
    ) -> None:
        if isinstance(keys, str):
            raise RouterConfigurationError("keys: must be a sequence of API keys, not one string")
        if not keys or any(not isinstance(k, str) or not k.strip() for k in keys):
            raise RouterConfigurationError(
                "keys: at least one API key is required, and none may be empty"
            )
        self._keys = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in keys]
        self._exempt = frozenset(exempt_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass exempt and authenticated calls on; answer the rest UNAUTHENTICATED."""
        if handler_call_details.method in self._exempt:
            return await continuation(handler_call_details)
        identity, refusal = self._authenticate(handler_call_details.invocation_metadata or ())
        handler = await continuation(handler_call_details)
        if refusal is not None:
            return _refusing(handler, refusal)
        return None if handler is None else _with_identity(handler, identity)

    def _authenticate(self, metadata: Iterable[Any]) -> tuple[str, str | None]:
        """(key id, None) for a valid key, else ("", message saying what was expected)."""
        presented: list[tuple[str, str]] = []
        for key, value in metadata:
            name = key.lower()
            if name == "x-api-key":
                presented.append(("x-api-key", _text(value).strip()))
            elif name == "authorization":
                scheme, _, token = _text(value).strip().partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return "", f"authorization metadata must be 'Bearer <key>'; {_EXPECTED}"
                presented.append(("authorization", token.strip()))
        if not presented:
            return "", f"missing API key: {_EXPECTED}"
        for _, token in presented:
            identity = self._match(token)
            if identity:
                return identity, None
        headers = " and ".join(sorted({header for header, _ in presented}))
        return "", f"invalid API key in '{headers}' metadata"

    def _match(self, token: str) -> str:
        """Key id of ``token`` or ""; compares against every key in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = ""
        for key_digest, identity in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = identity
        return found


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials from PEM files; mutual TLS (client cert required) with a CA."""
    cert = _read_pem(cert_file, "cert_file")
    key = _read_pem(key_file, "key_file")
    if client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    ca = _read_pem(client_ca_file, "client_ca_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def _read_pem(path: str | Path, name: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RouterConfigurationError(f"{name}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise RouterConfigurationError(f"{name}: {path} is not a PEM file")
    return data


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _refusing(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def _with_identity(handler: grpc.RpcMethodHandler, identity: str) -> grpc.RpcMethodHandler:
    """The same handler, run with CALLER_KEY_ID set to ``identity``."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attribute, make in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(
                _bind(behavior, identity),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _bind(behavior: Callable[..., Any], identity: str) -> Callable[..., Any]:
    """Wrap a handler function (async generator, coroutine or plain) to set the key id."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Any) -> Any:
            # Each RPC runs in its own task (own context copy): no reset needed, and a
            # reset from a generator finalised elsewhere would raise.
            CALLER_KEY_ID.set(identity)
            async for response in behavior(request, context):
                yield response

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def coroutine(request: Any, context: Any) -> Any:
            token = CALLER_KEY_ID.set(identity)
            try:
                return await behavior(request, context)
            finally:
                CALLER_KEY_ID.reset(token)

        return coroutine

    def plain(request: Any, context: Any) -> Any:
        token = CALLER_KEY_ID.set(identity)
        try:
            return behavior(request, context)
        finally:
            CALLER_KEY_ID.reset(token)

    return plain
