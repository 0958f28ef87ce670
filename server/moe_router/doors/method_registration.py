"""How the gRPC services put their methods on the server: every method through a generic
handler, and only the methods called once per forward step also registered with gRPC core.

A registered method skips the generic lookup, but grpc.aio's accept loop keeps one pending
"next call" future per registered method and waits on all of them (``asyncio.wait``) for
every call that arrives, adding and removing a callback on each. With every method of the
four services registered (21 futures) that was paid by every Route call; registering only
Route, RouteStream, ModelInfer and ModelStreamInfer leaves five futures (with the generic
one). Measured at 16 callers of 1-token Mixtral fp32 on the 2-core development machine,
two servers of each build side by side: 343-346 against 358-359 us of server CPU per
call (README "The server"). The other methods (Stats, Health, ListRouters, the
metadata and shared-memory calls, health checks, reflection) are served through the
generic handler at the cost of a few Python calls to find them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import grpc

__all__ = ["PER_CALL_METHODS", "add_method_handlers"]

PER_CALL_METHODS = frozenset({"Route", "RouteStream", "ModelInfer", "ModelStreamInfer"})
"""Methods a serving stack calls per MoE layer per forward step: registered with gRPC core."""


def add_method_handlers(server: grpc.aio.Server, service_name: str,
                        handlers: Mapping[str, grpc.RpcMethodHandler],
                        per_call: Collection[str] = PER_CALL_METHODS) -> None:
    """Serve ``handlers`` (method name -> handler) as ``service_name`` on ``server``; those
    named in ``per_call`` are also registered with gRPC core (module docstring)."""
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_name, dict(handlers)),))
    registered = {name: handler for name, handler in handlers.items() if name in per_call}
    if registered:
        server.add_registered_method_handlers(service_name, registered)
