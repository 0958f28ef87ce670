"""Status codes become typed client errors, through real gRPC servers on 127.0.0.1.

A generic ``grpc.aio`` handler aborts with each status code (not our service); a small
RouterService servicer checks what the clients send (auth metadata, retries, streams).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from moe_router_client import (
    AsyncRouterClient,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RouterClient,
    RouterError,
    TensorCodecError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
    from_wire,
    to_wire,
)
from moe_router_client.errors import STATUS_ERRORS
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

NAMED = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
}
FAILING_CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]
API_KEY = "s3cret"


def _rich_status(code: grpc.StatusCode, message: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason="CIRCUIT_OPEN", domain="moe-router",
        metadata={"request_id": "req-7", "error": "CircuitOpenError"},
    )
    delay = duration_pb2.Duration(seconds=1, nanos=500_000_000)
    retry = error_details_pb2.RetryInfo(retry_delay=delay)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    status.details.add().Pack(retry)
    return rpc_status.to_status(status)


class _AbortWithCode(grpc.GenericRpcHandler):
    """``/test.Failing/<CODE>`` aborts with that code; ``.../rich/<CODE>`` adds details."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        parts = details.method.split("/")  # type: ignore[attr-defined]
        if parts[1] != "test.Failing":
            return None
        rich, name = parts[2] == "rich", parts[-1]
        code = grpc.StatusCode[name]

        async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if rich:
                await context.abort_with_status(_rich_status(code, f"rich {name}"))
            await context.abort(code, f"aborted with {name}")
            return b""

        return grpc.unary_unary_rpc_method_handler(fail)


class _SmallRouterService(pb_grpc.RouterServiceServicer):
    """Answers top-1 = argmax over the hidden dim; fails on demand; counts attempts."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.flaky_failures = 2

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:  # noqa: N802,E501
        self.attempts[request.router] = self.attempts.get(request.router, 0) + 1
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {API_KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        if request.router == "missing":
            await context.abort_with_status(_rich_status(grpc.StatusCode.NOT_FOUND, "no 'missing'"))
        if request.router == "flaky" and self.attempts["flaky"] <= self.flaky_failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        hidden = from_wire(request.hidden_states).astype(np.float32)
        top1 = hidden.argmax(axis=-1).astype(np.int32)[..., None]
        return pb.RouteResponse(
            expert_indices=to_wire(top1),
            expert_weights=to_wire(np.ones(top1.shape, np.float32)),
            num_experts_per_token=to_wire(np.ones(top1.shape[:-1], np.int32)),
            info=pb.RoutingInfo(request_id=request.request_id, layer=request.layer),
        )

    async def RouteStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async for request in request_iterator:
            yield await self.Route(request, context)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:  # noqa: N802,E501
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown router '{request.router}'")
        return pb.StatsResponse()


async def _start(service: _SmallRouterService) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_AbortWithCode()])
    pb_grpc.add_RouterServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@contextmanager
def _server_thread(service: _SmallRouterService) -> Iterator[int]:
    """A grpc.aio server on its own event loop in a thread, for the blocking client."""
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        started["server"], started["port"] = loop.run_until_complete(_start(service))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30), "test server did not start"
    try:
        yield started["port"]
    finally:
        asyncio.run_coroutine_threadsafe(started["server"].stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module")
def service_port() -> Iterator[tuple[_SmallRouterService, int]]:
    service = _SmallRouterService()
    with _server_thread(service) as port:
        yield service, port


def _call_failing(port: int, path: str) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path)(b"", timeout=10)
    return info.value


def test_every_status_code_has_exactly_one_class() -> None:
    assert set(STATUS_ERRORS) == set(grpc.StatusCode)
    for code, cls in STATUS_ERRORS.items():
        assert cls is NAMED.get(code, InternalError), code
        assert issubclass(cls, RouterError)


@pytest.mark.parametrize("code", FAILING_CODES, ids=lambda c: c.name)
def test_blocking_call_failure_maps_to_its_class(
    service_port: tuple[_SmallRouterService, int], code: grpc.StatusCode
) -> None:
    exc = _call_failing(service_port[1], f"/test.Failing/{code.name}")
    error = error_from_rpc(exc)
    assert type(error) is NAMED.get(code, InternalError)
    assert error.code is code
    assert error.details == f"aborted with {code.name}"
    assert error.reason is None and error.retry_after_s is None
    assert code.name in str(error)


def test_aio_call_failures_map_to_their_classes() -> None:
    async def body() -> dict[grpc.StatusCode, RouterError]:
        server, port = await _start(_SmallRouterService())
        mapped = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for code in FAILING_CODES:
                    try:
                        await channel.unary_unary(f"/test.Failing/{code.name}")(b"", timeout=10)
                    except grpc.RpcError as exc:
                        mapped[code] = error_from_rpc(exc)
        finally:
            await server.stop(None)
        return mapped

    mapped = asyncio.run(body())
    assert set(mapped) == set(FAILING_CODES)
    for code, error in mapped.items():
        assert type(error) is NAMED.get(code, InternalError)
        assert (error.code, error.details) == (code, f"aborted with {code.name}")


def test_rich_details_give_reason_retry_delay_and_request_id(
    service_port: tuple[_SmallRouterService, int],
) -> None:
    error = error_from_rpc(_call_failing(service_port[1], "/test.Failing/rich/UNAVAILABLE"))
    assert isinstance(error, UnavailableError)
    assert error.reason == "CIRCUIT_OPEN"
    assert error.retry_after_s == 1.5
    assert error.request_id == "req-7"
    assert error.metadata["error"] == "CircuitOpenError"
    assert "retry after 1.5 s" in str(error)


def test_without_grpcio_status_the_class_still_maps(
    service_port: tuple[_SmallRouterService, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    exc = _call_failing(service_port[1], "/test.Failing/rich/RESOURCE_EXHAUSTED")
    monkeypatch.setitem(sys.modules, "grpc_status", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "grpc_status.rpc_status", None)
    error = error_from_rpc(exc)
    assert isinstance(error, ResourceExhaustedError)
    assert error.details == "rich RESOURCE_EXHAUSTED"
    assert error.reason is None and error.retry_after_s is None


def test_client_raises_typed_errors_from_the_grpc_error(
    service_port: tuple[_SmallRouterService, int],
) -> None:
    port = service_port[1]
    hidden = np.zeros((2, 4), np.float32)
    with RouterClient(f"127.0.0.1:{port}", api_key=API_KEY, timeout=10) as client:
        with pytest.raises(NotFoundError) as info:
            client.route("missing", hidden)
        assert isinstance(info.value.__cause__, grpc.RpcError)
        assert info.value.reason == "CIRCUIT_OPEN" and info.value.retry_after_s == 1.5
        with pytest.raises(NotFoundError, match="unknown router 'nope'"):
            client.stats("nope")
    with RouterClient(f"127.0.0.1:{port}", api_key="wrong", timeout=10) as client:
        with pytest.raises(UnauthenticatedError):
            client.route("r", hidden)
    with RouterClient(f"127.0.0.1:{port}", timeout=10) as client:
        with pytest.raises(UnauthenticatedError):
            client.route("r", hidden)


def test_client_sends_the_key_and_decodes_the_answer(
    service_port: tuple[_SmallRouterService, int],
) -> None:
    hidden = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float16)
    with RouterClient(f"127.0.0.1:{service_port[1]}", api_key=API_KEY, timeout=10) as client:
        result = client.route("r", hidden, layer=4, request_id="abc")
    np.testing.assert_array_equal(result.expert_indices[..., 0], hidden.argmax(axis=-1))
    assert result.expert_weights.shape == (2, 3, 1)
    assert result.router_logits is None and result.complexity_scores is None
    assert (result.info.request_id, result.info.layer, result.info.aux_loss) == ("abc", 4, None)


def test_unavailable_is_retried_by_the_channel_up_to_retries(
    service_port: tuple[_SmallRouterService, int],
) -> None:
    service, port = service_port
    hidden = np.eye(3, dtype=np.float32)
    service.attempts["flaky"] = 0
    with RouterClient(f"127.0.0.1:{port}", api_key=API_KEY, timeout=10, retries=3) as client:
        result = client.route("flaky", hidden)
    assert service.attempts["flaky"] == 3  # two UNAVAILABLE, then the answer
    np.testing.assert_array_equal(result.expert_indices[:, 0], [0, 1, 2])
    service.attempts["flaky"] = 0
    with RouterClient(f"127.0.0.1:{port}", api_key=API_KEY, timeout=10, retries=0) as client:
        with pytest.raises(UnavailableError, match="warming up"):
            client.route("flaky", hidden)
    assert service.attempts["flaky"] == 1


def test_stream_yields_in_order_then_raises_the_item_that_cannot_be_sent(
    service_port: tuple[_SmallRouterService, int],
) -> None:
    eye = np.eye(4, dtype=np.float32)
    items: list[Any] = [("r", eye[[3, 1]]),
                        {"router": "r", "hidden_states": eye[[2]], "layer": 1},
                        ("r", np.zeros((1, 4), np.float64))]
    with RouterClient(f"127.0.0.1:{service_port[1]}", api_key=API_KEY, timeout=10) as client:
        results = client.route_stream(items)
        assert next(results).expert_indices[:, 0].tolist() == [3, 1]
        second = next(results)
        assert (second.expert_indices[:, 0].tolist(), second.info.layer) == ([2], 1)
        with pytest.raises(TensorCodecError, match="float64"):
            next(results)


def test_async_client_raises_the_same_typed_errors() -> None:
    async def body() -> None:
        service = _SmallRouterService()
        server, port = await _start(service)
        hidden = np.eye(3, dtype=np.float32)
        try:
            target = f"127.0.0.1:{port}"
            async with AsyncRouterClient(target, api_key=API_KEY, timeout=10) as client:
                with pytest.raises(NotFoundError) as info:
                    await client.route("missing", hidden)
                assert info.value.retry_after_s == 1.5
                with pytest.raises(NotFoundError):
                    await client.stats()
                result = await client.route("flaky", hidden)  # retried twice by the channel
                assert result.expert_indices[:, 0].tolist() == [0, 1, 2]
                streamed = [r.expert_indices[:, 0].tolist() async for r in client.route_stream(
                    [("r", hidden[[2]]), ("r", hidden[[0]])])]
                assert streamed == [[2], [0]]
                with pytest.raises(TensorCodecError):
                    async for _ in client.route_stream([("r", hidden.astype(np.float64))]):
                        pass
            async with AsyncRouterClient(f"127.0.0.1:{port}", timeout=10) as client:
                with pytest.raises(UnauthenticatedError):
                    await client.route("r", hidden)
        finally:
            await server.stop(None)

    asyncio.run(body())


def test_unreachable_server_is_unavailable() -> None:
    with RouterClient("127.0.0.1:1", timeout=5, retries=0) as client:
        with pytest.raises(UnavailableError):
            client.health()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"retries": 5}, "retries"),
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"load_balancing": "random"}, "load_balancing"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"api_key": ""}, "api_key"),
        ({"root_certificates": b"pem"}, "tls=True"),
        ({"tls": True, "private_key": b"k"}, "certificate_chain"),
        ({"target": ""}, "target"),
    ],
)
def test_bad_constructor_arguments_fail_naming_the_argument(
    kwargs: dict[str, Any], needle: str
) -> None:
    factory: Callable[..., Any] = RouterClient
    with pytest.raises(ValueError, match=needle):
        factory(**kwargs)
