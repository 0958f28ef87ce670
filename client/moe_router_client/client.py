"""RouterClient (blocking) and AsyncRouterClient (``grpc.aio``) for moe_router.v1.RouterService.

Both take the same arguments and offer the same calls, ``route``, ``route_stream``,
``stats``, ``health`` and ``list_routers``, returning the frozen dataclasses of
:mod:`moe_router_client.results`. Each call gets a default deadline; the channel's
transport settings (retries of UNAVAILABLE through gRPC's own retry policy, optional
round-robin load balancing, TLS / mutual TLS, the API key sent as
``authorization: Bearer <key>`` metadata) are :mod:`moe_router_client.channel`'s. Every
``grpc.RpcError`` is raised as the typed :class:`~moe_router_client.errors.RouterError`
subclass for its status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from moe_router_client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    ChannelSettings,
    LoadBalancing,
    route_methods,
)
from moe_router_client.errors import error_from_rpc
from moe_router_client.request_encoding import encode_route_request, scalar_fields
from moe_router_client.results import (
    HealthReport,
    RouteResult,
    RouterInfo,
    RouterStats,
    health_from_proto,
    route_result_from_proto,
    router_info_from_proto,
    router_stats_from_proto,
)
from moe_router_client.tensors import to_wire
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LoadBalancing",
    "StreamItem",
    "build_route_request",
    "RouterClient",
    "AsyncRouterClient",
]

# A route_stream item: keyword arguments of ``route`` (without timeout / as_torch), or a
# ``(router, hidden_states)`` / ``(router, hidden_states, layer)`` tuple.
StreamItem = Mapping[str, Any] | tuple[Any, ...]

_EXTRA_INPUTS = ("attention_weights", "logits", "gradients", "input_ids")


def build_route_request(
    router: str,
    hidden_states: Any,
    layer: int = 0,
    *,
    return_router_logits: bool = False,
    skip_cache: bool = False,
    seed: int | None = None,
    attention_weights: Any = None,
    logits: Any = None,
    gradients: Any = None,
    request_id: str | None = None,
    input_ids: Any = None,
    return_losses: bool = False,
) -> pb.RouteRequest:
    """The RouteRequest ``route`` sends; tensors are encoded straight into their fields.

    ``hidden_states``: ``[T, D]`` or ``[B, S, D]`` numpy array or torch tensor (float32,
    float16, bfloat16). ``attention_weights`` ``[B, H, S, S]`` / ``[B, S, S]``, ``logits``
    ``[B, S, V]`` and ``gradients`` (like hidden_states) feed dynamic routers' estimators.
    ``input_ids`` (int32 or int64, ``[T]`` or ``[B, S]``): the tokens' ids, which hash
    routers (DeepSeek-V4's first layers) route by. ``return_losses``: have the answer
    carry the call's aux and z losses (computed only when asked).
    """
    request = scalar_fields(router, layer, return_router_logits, skip_cache, seed, request_id,
                            return_losses)
    to_wire(hidden_states, out=request.hidden_states)
    extras = (attention_weights, logits, gradients, input_ids)
    for name, value in zip(_EXTRA_INPUTS, extras, strict=True):
        if value is not None:
            to_wire(value, out=getattr(request, name))
    return request


def _stream_request(item: StreamItem) -> bytes:
    """A route_stream item (mapping or tuple) as a serialized RouteRequest."""
    if isinstance(item, Mapping):
        return encode_route_request(**item)
    if isinstance(item, tuple) and len(item) in (2, 3):
        return encode_route_request(*item)
    raise TypeError(
        "route_stream items are dicts of route() arguments or (router, hidden_states[, layer]) "
        f"tuples, not {type(item).__name__}"
    )


class RouterClient:
    """Blocking client of a moe-router server.

    ``target``: ``host:port`` (or ``dns:///host:port`` with ``load_balancing=
    "round_robin"`` across the addresses it resolves to). ``api_key``: sent as
    ``authorization: Bearer <key>``. ``tls`` with optional PEM ``root_certificates`` and,
    for mutual TLS, ``private_key`` + ``certificate_chain``. ``timeout``: default deadline
    in seconds per call (None: none). ``retries``: how many times gRPC retries a call
    that fails UNAVAILABLE (0..4, exponential backoff 0.1 s .. 2 s). ``options``: extra
    gRPC channel arguments, overriding ours. Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = None,
        retries: int = 3,
        load_balancing: LoadBalancing | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self._settings = ChannelSettings(
            target, api_key, tls, root_certificates, private_key, certificate_chain,
            timeout, retries, load_balancing, max_message_bytes, options,
        )
        s = self._settings
        self._channel = (
            grpc.secure_channel(s.target, s.credentials, options=s.options)
            if s.credentials is not None
            else grpc.insecure_channel(s.target, options=s.options)
        )
        self._stub = pb_grpc.RouterServiceStub(self._channel)
        self._route, self._route_stream = route_methods(self._channel)

    def route(
        self,
        router: str,
        hidden_states: Any,
        layer: int = 0,
        *,
        return_router_logits: bool = False,
        skip_cache: bool = False,
        seed: int | None = None,
        attention_weights: Any = None,
        logits: Any = None,
        gradients: Any = None,
        request_id: str | None = None,
        input_ids: Any = None,
        return_losses: bool = False,
        timeout: float | None = None,
        as_torch: bool = False,
    ) -> RouteResult:
        """Route one batch of tokens ``[T, D]`` or ``[B, S, D]`` for one MoE layer.

        ``input_ids`` (int32/int64, the leading dims of hidden_states): the tokens' ids,
        required by hash routers and refused by the others. ``return_losses``: the answer
        carries the call's ``aux_loss`` and ``z_loss`` (else they are None).
        """
        request = encode_route_request(
            router, hidden_states, layer, return_router_logits=return_router_logits,
            skip_cache=skip_cache, seed=seed, attention_weights=attention_weights,
            logits=logits, gradients=gradients, request_id=request_id, input_ids=input_ids,
            return_losses=return_losses,
        )
        try:
            response = self._route(
                request, timeout=self._settings.deadline(timeout), metadata=self._settings.metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return route_result_from_proto(response, as_torch)

    def route_stream(
        self,
        requests: Iterable[StreamItem],
        *,
        timeout: float | None = None,
        as_torch: bool = False,
    ) -> Iterator[RouteResult]:
        """Route many calls over one stream (e.g. layer after layer); results in order.

        Lazy: the stream opens at the first ``next()``. ``timeout`` bounds the whole
        stream. An item that cannot be encoded ends the stream: the results before it
        are yielded, then its error is raised.
        """
        feed = _RequestFeed(requests)
        call = self._route_stream(
            feed, timeout=self._settings.deadline(timeout), metadata=self._settings.metadata
        )
        try:
            for response in call:
                yield route_result_from_proto(response, as_torch)
        except grpc.RpcError as exc:
            raise (feed.error or error_from_rpc(exc)) from exc
        finally:
            call.cancel()  # no-op once finished; stops the stream if the caller stops early
        if feed.error is not None:
            raise feed.error

    def stats(
        self, router: str | None = None, *, timeout: float | None = None
    ) -> list[RouterStats]:
        """Cumulative statistics of one router, or of every router (``router=None``)."""
        try:
            response = self._stub.Stats(
                pb.StatsRequest(router=router or ""),
                timeout=self._settings.deadline(timeout), metadata=self._settings.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return [router_stats_from_proto(s) for s in response.routers]

    def health(self, *, timeout: float | None = None) -> HealthReport:
        """The server's and each router's serving state."""
        try:
            response = self._stub.Health(
                pb.HealthRequest(), timeout=self._settings.deadline(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return health_from_proto(response)

    def list_routers(self, *, timeout: float | None = None) -> list[RouterInfo]:
        """The routers the server hosts, with their shapes and accepted dtypes."""
        try:
            response = self._stub.ListRouters(
                pb.ListRoutersRequest(), timeout=self._settings.deadline(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return [router_info_from_proto(r) for r in response.routers]

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _RequestFeed:
    """Encodes route_stream items as gRPC pulls them; keeps an encoding error, half-closes.

    gRPC consumes request iterators on its own thread and would only log an exception
    raised there; this keeps it so route_stream can raise it to the caller.
    """

    def __init__(self, items: Iterable[StreamItem]) -> None:
        self._items = iter(items)
        self.error: Exception | None = None

    def __iter__(self) -> _RequestFeed:
        return self

    def __next__(self) -> bytes:
        if self.error is not None:
            raise StopIteration
        try:
            return _stream_request(next(self._items))  # StopIteration ends the stream
        except StopIteration:
            raise
        except Exception as exc:  # the caller's iterable or an item failed
            self.error = exc
            raise StopIteration from None


class AsyncRouterClient:
    """``grpc.aio`` client of a moe-router server: :class:`RouterClient`'s arguments and
    calls, as coroutines; ``route_stream`` is an async iterator. Use ``async with`` or
    ``await close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = None,
        retries: int = 3,
        load_balancing: LoadBalancing | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self._settings = ChannelSettings(
            target, api_key, tls, root_certificates, private_key, certificate_chain,
            timeout, retries, load_balancing, max_message_bytes, options,
        )
        s = self._settings
        self._channel = (
            grpc.aio.secure_channel(s.target, s.credentials, options=s.options)
            if s.credentials is not None
            else grpc.aio.insecure_channel(s.target, options=s.options)
        )
        self._stub = pb_grpc.RouterServiceStub(self._channel)
        self._route, self._route_stream = route_methods(self._channel)

    async def route(
        self,
        router: str,
        hidden_states: Any,
        layer: int = 0,
        *,
        return_router_logits: bool = False,
        skip_cache: bool = False,
        seed: int | None = None,
        attention_weights: Any = None,
        logits: Any = None,
        gradients: Any = None,
        request_id: str | None = None,
        input_ids: Any = None,
        return_losses: bool = False,
        timeout: float | None = None,
        as_torch: bool = False,
    ) -> RouteResult:
        """Route one batch of tokens ``[T, D]`` or ``[B, S, D]`` for one MoE layer.

        ``input_ids`` (int32/int64, the leading dims of hidden_states): the tokens' ids,
        required by hash routers and refused by the others. ``return_losses``: the answer
        carries the call's ``aux_loss`` and ``z_loss`` (else they are None).
        """
        request = encode_route_request(
            router, hidden_states, layer, return_router_logits=return_router_logits,
            skip_cache=skip_cache, seed=seed, attention_weights=attention_weights,
            logits=logits, gradients=gradients, request_id=request_id, input_ids=input_ids,
            return_losses=return_losses,
        )
        try:
            response = await self._route(
                request, timeout=self._settings.deadline(timeout), metadata=self._settings.metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return route_result_from_proto(response, as_torch)

    async def route_stream(
        self,
        requests: Iterable[StreamItem] | AsyncIterable[StreamItem],
        *,
        timeout: float | None = None,
        as_torch: bool = False,
    ) -> AsyncIterator[RouteResult]:
        """Route many calls over one stream; ``async for`` the results, in order.

        ``timeout`` bounds the whole stream. An item that cannot be encoded ends the
        stream: the results before it are yielded, then its error is raised.
        """
        failure: list[Exception] = []

        async def feed() -> AsyncIterator[bytes]:
            try:
                if isinstance(requests, AsyncIterable):
                    async for item in requests:
                        yield _stream_request(item)
                else:
                    for item in requests:
                        yield _stream_request(item)
            except Exception as exc:  # kept for the caller; the stream half-closes
                failure.append(exc)

        call = self._route_stream(
            feed(), timeout=self._settings.deadline(timeout), metadata=self._settings.metadata
        )
        try:
            async for response in call:
                yield route_result_from_proto(response, as_torch)
        except grpc.RpcError as exc:
            raise (failure[0] if failure else error_from_rpc(exc)) from exc
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    async def stats(
        self, router: str | None = None, *, timeout: float | None = None
    ) -> list[RouterStats]:
        """Cumulative statistics of one router, or of every router (``router=None``)."""
        try:
            response = await self._stub.Stats(
                pb.StatsRequest(router=router or ""),
                timeout=self._settings.deadline(timeout), metadata=self._settings.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return [router_stats_from_proto(s) for s in response.routers]

    async def health(self, *, timeout: float | None = None) -> HealthReport:
        """The server's and each router's serving state."""
        try:
            response = await self._stub.Health(
                pb.HealthRequest(), timeout=self._settings.deadline(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return health_from_proto(response)

    async def list_routers(self, *, timeout: float | None = None) -> list[RouterInfo]:
        """The routers the server hosts, with their shapes and accepted dtypes."""
        try:
            response = await self._stub.ListRouters(
                pb.ListRoutersRequest(), timeout=self._settings.deadline(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return [router_info_from_proto(r) for r in response.routers]

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
