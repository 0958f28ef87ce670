"""The transport floor of ``moe-router bench``: a bare grpc.aio server that answers bytes.

One generic unary method, no protobuf parsing: the request arrives as ``bytes`` and the
answer is a (cached) ``bytes`` payload of the size the caller names in the
``x-response-bytes`` metadata, the size the real service would send back for the same
request. What the real service costs above this server is its own work.

Run as a child process, it prints ``listening on HOST:PORT`` and serves until SIGTERM or
SIGINT. It imports only grpcio (and, pinned, the pinning module, which needs nothing
more), so that its interpreter carries nothing the floor would not (the bench runs this
file with ``runpy`` rather than ``-m``, which would import ``moe_router.analysis`` and
with it torch).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import grpc

__all__ = ["ECHO_METHOD", "RESPONSE_BYTES_KEY", "MAX_MESSAGE_BYTES", "EchoHandler", "serve"]

ECHO_METHOD = "/moe_router.bench.Echo/Call"
RESPONSE_BYTES_KEY = "x-response-bytes"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # above the service's 256 MiB default: never the limit


class EchoHandler(grpc.GenericRpcHandler):
    """Answers :data:`ECHO_METHOD` with ``x-response-bytes`` zero bytes (0 when absent)."""

    def __init__(self) -> None:
        self._payloads: dict[int, bytes] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """The method handler for :data:`ECHO_METHOD`; None (UNIMPLEMENTED) for any other."""
        if handler_call_details.method != ECHO_METHOD:
            return None
        return grpc.unary_unary_rpc_method_handler(self._call)  # no (de)serializer: bytes

    def _payload(self, size: int) -> bytes:
        payload = self._payloads.get(size)
        if payload is None:
            payload = self._payloads[size] = bytes(size)
        return payload

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        size = 0
        for key, value in context.invocation_metadata() or ():
            if key == RESPONSE_BYTES_KEY:
                size = int(value)
        return self._payload(size)


async def serve(host: str = "127.0.0.1", port: int = 0, event_loop_cpu: int | None = None
                ) -> None:
    """Serve until SIGTERM/SIGINT, announcing ``listening on HOST:PORT`` on stdout;
    ``event_loop_cpu``: pinned as the service pins it (``server.event_loop_cpu``), so that
    the floor of a pinned service is measured pinned too."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    server.add_generic_rpc_handlers((EchoHandler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if event_loop_cpu is not None:
        from moe_router.doors.cpu_pinning import pin_event_loop  # no torch: moe_router.errors

        pin_event_loop(event_loop_cpu)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(grace=0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python echo_server.py [--host H] [--port P] [--event-loop-cpu N]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--event-loop-cpu", type=int, default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(serve(args.host, args.port, args.event_loop_cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
