"""``moe-router healthcheck``: ask a server's grpc.health.v1 whether it serves; exit 0 or 1.

For a container ``HEALTHCHECK`` and for scripts: one line on stdout, exit status 0 when
the named service answers SERVING and 1 otherwise (NOT_SERVING while the routers load or
once draining starts, a service name the server does not know, nothing listening, no
answer within the timeout). It imports only grpcio and grpcio-health-checking, never
torch, so a check every few seconds costs a fraction of a second. It speaks plaintext
gRPC: a server with ``security.tls.enabled`` answers probes on its plain-HTTP
``/readyz`` instead (the health section of config.yaml).

Service names (``doors/health.py``): ``""`` and ``moe_router.v1.RouterService`` for the
whole server, ``moe_router.v1.RouterService/<router>`` for one router.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = [
    "DEFAULT_TARGET",
    "HealthCheckOutcome",
    "check_health",
    "add_healthcheck_command",
    "main",
]

DEFAULT_TARGET = "127.0.0.1:50051"
_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class HealthCheckOutcome:
    """What one check found: ``healthy`` decides the exit status, ``line`` is printed."""

    healthy: bool
    line: str

    @property
    def exit_status(self) -> int:
        """0 when SERVING, else 1 (the convention of Docker's HEALTHCHECK)."""
        return 0 if self.healthy else 1


def check_health(target: str, service: str = "", timeout_s: float = 3.0) -> HealthCheckOutcome:
    """Call ``grpc.health.v1.Health/Check`` for ``service`` on ``target`` (host:port)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: a positive number of seconds, got {timeout_s!r}")
    shown = repr(service) if service else "the server ('')"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout_s,
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            return _failed_call(exc, target, shown, timeout_s)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthCheckOutcome(reply.status == _SERVING, f"{status}: {shown} at {target}")


def _failed_call(
    exc: grpc.RpcError, target: str, shown: str, timeout_s: float
) -> HealthCheckOutcome:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    if code is grpc.StatusCode.NOT_FOUND:
        line = f"UNKNOWN_SERVICE: {target} serves no health status for {shown}"
    elif code is grpc.StatusCode.UNAVAILABLE:
        line = f"UNREACHABLE: nothing answers gRPC at {target}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        line = f"TIMEOUT: {target} did not answer within {timeout_s:g} s"
    else:
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        line = f"{code.name}: {target}: {(details or '')[:200]}"
    return HealthCheckOutcome(False, line)


def add_healthcheck_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``healthcheck`` to the ``moe-router`` command's subparsers (cli.py calls this)."""
    parser = subparsers.add_parser(
        "healthcheck",
        help="ask a running server's grpc.health.v1 whether it serves (exit 0) or not (1)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET,
        help=f"host:port of the server (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--service",
        default="",
        help="health service name: '' (default) or moe_router.v1.RouterService for the whole "
        "server, moe_router.v1.RouterService/<router> for one router",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        print(f"moe-router healthcheck: --timeout must be positive, got {args.timeout}",
              file=sys.stderr)
        return 2
    outcome = check_health(args.target, args.service, args.timeout)
    print(outcome.line, flush=True)
    return outcome.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_router.doors.healthcheck [--target ...] [--service ...]``."""
    parser = argparse.ArgumentParser(prog="moe-router")
    add_healthcheck_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["healthcheck", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
