"""Raw calls to a moe_router.v1 server: any bytes as any method's request, the answer's
status code, message and ErrorInfo (bad-input and fuzz tests).

``RawCaller`` sends bytes as they are (no client-side checks, no retries) so a test can
say exactly what went over the wire, and reads the rich status the server attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moe_router_client.v1 import router_pb2 as pb

SERVICE = "/moe_router.v1.RouterService/"
METHODS = ("Route", "Stats", "Health", "ListRouters")


@dataclass(frozen=True)
class Answer:
    """A call's outcome: gRPC code name, details, ErrorInfo reason and metadata."""

    code: str
    details: str = ""
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    response: bytes = b""


class RawCaller:
    """Unary calls with raw request bytes over one channel (no retries)."""

    def __init__(self, target: str, max_message_bytes: int = 64 << 20) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.enable_retries", 0),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._methods = {
            name: self.channel.unary_unary(SERVICE + name) for name in METHODS
        }

    def call(self, method: str, request: bytes, timeout: float = 30.0) -> Answer:
        """Send ``request`` as ``method``'s message; the answer however it went."""
        try:
            response = self._methods[method](request, timeout=timeout)
        except grpc.RpcError as exc:
            return answer_of(exc)
        return Answer("OK", response=response)

    def route(self, request: pb.RouteRequest, timeout: float = 30.0) -> Answer:
        """A Route call with a (possibly nonsensical) RouteRequest."""
        return self.call("Route", request.SerializeToString(), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RawCaller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def answer_of(exc: grpc.RpcError) -> Answer:
    """The Answer of a failed call, rich details included when the server sent them."""
    code = exc.code().name  # type: ignore[attr-defined]
    details = exc.details() or ""  # type: ignore[attr-defined]
    reason, metadata, retry = "", {}, None
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return Answer(code, details, reason, metadata, retry)


def tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    """A wire Tensor exactly as given (shape and data need not agree)."""
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def f32(shape: list[int], value: float = 0.5) -> pb.Tensor:
    """A consistent FLOAT32 tensor of ``shape`` filled with ``value``."""
    import numpy as np

    return pb.Tensor(
        dtype=pb.FLOAT32, shape=shape, data=np.full(shape, value, np.float32).tobytes()
    )
