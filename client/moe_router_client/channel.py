"""The channel both clients open: validated settings, retry policy, TLS, API key, methods.

:class:`ChannelSettings` checks the constructor arguments ``RouterClient`` and
``AsyncRouterClient`` share and turns them into what grpcio takes: channel options
(message limits, gRPC's own retry policy for UNAVAILABLE as a service config, the load
balancing policy), credentials and the ``authorization: Bearer <key>`` metadata.
:func:`route_methods` binds Route and RouteStream to pre-serialized requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, get_args

import grpc

from moe_router_client.v1 import router_pb2 as pb

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_RETRIES",
    "LoadBalancing",
    "ChannelSettings",
    "route_methods",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
LoadBalancing = Literal["pick_first", "round_robin"]
MAX_RETRIES = 4  # gRPC caps attempts at 5

_SERVICE = "moe_router.v1.RouterService"
_ROUTE = f"/{_SERVICE}/Route"
_ROUTE_STREAM = f"/{_SERVICE}/RouteStream"
_RETRY_BACKOFF = {"initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2}


def _service_config(retries: int, load_balancing: LoadBalancing | None) -> str | None:
    """gRPC service config JSON: retry UNAVAILABLE ``retries`` times; the LB policy."""
    config: dict[str, Any] = {}
    if retries > 0:
        policy = {
            "maxAttempts": retries + 1, **_RETRY_BACKOFF, "retryableStatusCodes": ["UNAVAILABLE"]
        }
        config["methodConfig"] = [{"name": [{"service": _SERVICE}], "retryPolicy": policy}]
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return json.dumps(config) if config else None


def _optional_bytes(name: str, value: bytes | None) -> None:
    if value is not None and not isinstance(value, bytes):
        raise TypeError(f"{name}: PEM bytes (open(path, 'rb').read()), not {type(value).__name__}")


class ChannelSettings:
    """The validated constructor arguments shared by both clients, as grpcio takes them."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        tls: bool,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        timeout: float | None,
        retries: int,
        load_balancing: LoadBalancing | None,
        max_message_bytes: int,
        options: Sequence[tuple[str, Any]] | None,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target: a 'host:port' or 'dns:///host:port' string, got {target!r}")
        if api_key is not None and (not api_key or not api_key.isprintable()):
            raise ValueError("api_key: a non-empty printable string, or None for no key")
        for name, value in (("root_certificates", root_certificates), ("private_key", private_key),
                            ("certificate_chain", certificate_chain)):
            _optional_bytes(name, value)
            if value is not None and not tls:
                raise ValueError(f"{name}: given but tls=False; pass tls=True to use it")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("private_key and certificate_chain: give both (mutual TLS) or neither")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: seconds > 0, or None for no deadline, got {timeout!r}")
        if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"retries: an int in 0..{MAX_RETRIES} (gRPC caps attempts at 5), "
                             f"got {retries!r}")
        if load_balancing is not None and load_balancing not in get_args(LoadBalancing):
            raise ValueError(f"load_balancing: one of {get_args(LoadBalancing)} or None, "
                             f"got {load_balancing!r}")
        if type(max_message_bytes) is not int or max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes: a positive int, got {max_message_bytes!r}")
        self.target = target
        self.timeout = timeout
        self.credentials = (
            grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            if tls else None
        )
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key is not None else ()
        )
        channel_options: dict[str, Any] = {
            "grpc.max_send_message_length": max_message_bytes,
            "grpc.max_receive_message_length": max_message_bytes,
            "grpc.enable_retries": int(retries > 0),
        }
        service_config = _service_config(retries, load_balancing)
        if service_config is not None:
            channel_options["grpc.service_config"] = service_config
        channel_options.update(dict(options or ()))  # the caller's options win
        self.options = list(channel_options.items())

    def deadline(self, timeout: float | None) -> float | None:
        """The call's timeout: its own, else the client's default."""
        return self.timeout if timeout is None else timeout


def route_methods(channel: Any) -> tuple[Any, Any]:
    """(Route, RouteStream) callables of a ``grpc`` or ``grpc.aio`` channel.

    Requests go out pre-serialized (one copy of the payload, see
    :mod:`moe_router_client.request_encoding`); answers are parsed by protobuf as usual.
    """
    route = channel.unary_unary(
        _ROUTE, request_serializer=None, response_deserializer=pb.RouteResponse.FromString
    )
    route_stream = channel.stream_stream(
        _ROUTE_STREAM, request_serializer=None, response_deserializer=pb.RouteResponse.FromString
    )
    return route, route_stream
