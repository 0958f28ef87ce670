"""Two or more servers and the echo, measured side by side: Route p50 over gRPC, one caller.

    python scripts/measure_side_by_side.py NAME=CONFIG[@CHECKOUT] ... [--router mixtral]
        [--tokens 1] [--dtype float32] [--rounds 4] [--seconds 2]

Each ``NAME=CONFIG`` starts ``moe-router serve --config CONFIG --port 0`` (metrics and health
on free ports too); ``@CHECKOUT`` runs it from another source tree (a ``git worktree`` of
the commit to compare against), so a change is measured against the code before it on
the same machine, at the same time. The bench's echo server (the transport floor) joins
them. One caller then times closed-loop Route calls of the same request bytes against
each in turn, round after round (``--seconds`` each), and prints every round's p50, the
medians and each one's ratio to the echo: ``make bench`` judges one build against its
floors, this judges builds against each other, which ``--compare`` of two runs cannot do
within the noise of a shared machine (README "Benchmarks").

Before timing, every server must give the same answer bytes for the request (minus the
request id and the measured times): a change that moved an answer is not a speed-up.
Answers are parsed as the bench's client parses them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from moe_router.analysis import echo_server
from moe_router.analysis.load_client import ListeningProcess, python_file_command
from moe_router_client import RouterClient
from moe_router_client.tensors import to_wire
from moe_router_client.v1 import router_pb2 as pb

ROUTE_METHOD = "/moe_router.v1.RouterService/Route"
_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServerSpec:
    """One server to start: a name for the report, its config, the tree it runs from."""

    name: str
    config: Path
    checkout: Path | None

    @classmethod
    def parse(cls, text: str) -> ServerSpec:
        name, sep, rest = text.partition("=")
        config, _, checkout = rest.partition("@")
        if not sep or not name or not config or name == "echo":
            raise argparse.ArgumentTypeError(
                f"expected NAME=CONFIG[@CHECKOUT] with a NAME other than 'echo', got {text!r}")
        return cls(name, Path(config), Path(checkout) if checkout else None)


def start_server(spec: ServerSpec) -> ListeningProcess:
    """``moe-router serve`` for ``spec``, on free ports (not yet waited for)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DYNAMIC_MOE_METRICS_PORT": "0",
           "DYNAMIC_MOE_HEALTH_PORT": "0"}
    if spec.checkout is not None:
        root = spec.checkout.resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(root / "server"), str(root / "client")])
    command = [sys.executable, "-m", "moe_router", "serve", "--config", str(spec.config),
               "--port", "0"]
    return ListeningProcess(command, env, spec.name)


def route_request(target: str, router: str, tokens: int, dtype: str) -> bytes:
    """The serialized RouteRequest every server gets: seeded hidden states of the
    router's input dim (asked of the server)."""
    with RouterClient(target) as client:
        dims = {r.name: r.input_dim for r in client.list_routers()}
    if router not in dims:
        raise SystemExit(f"router '{router}' is not served; the servers host {sorted(dims)}")
    hidden = np.random.default_rng(0).standard_normal((tokens, dims[router]), np.float32)
    request = pb.RouteRequest(router=router, layer=0, skip_cache=True)
    if dtype == "bfloat16":  # the client's numpy form of bf16: the top half of fp32
        to_wire((hidden.view(np.uint32) >> 16).astype(np.uint16), dtype=pb.BFLOAT16,
                out=request.hidden_states)
    else:
        to_wire(hidden, out=request.hidden_states)
    return request.SerializeToString()


def differences(answer: bytes, expected: bytes) -> list[str]:
    """The RouteResponse fields (``info.*`` for RoutingInfo's) in which ``answer``
    differs from ``expected``, leaving out what differs between any two calls: the
    request id and the measured times."""
    got, want = pb.RouteResponse.FromString(answer), pb.RouteResponse.FromString(expected)
    for info in (got.info, want.info):
        info.request_id = ""
        info.queue_time_us = info.compute_time_us = 0
    fields = [f"info.{f.name}" for f in pb.RoutingInfo.DESCRIPTOR.fields]
    fields += [f.name for f in pb.RouteResponse.DESCRIPTOR.fields if f.name != "info"]

    def value(message: pb.RouteResponse, path: str) -> object:
        owner, name = (message.info, path[5:]) if path.startswith("info.") else (message, path)
        field = getattr(owner, name)
        return field.SerializeToString() if hasattr(field, "SerializeToString") else field

    return [path for path in fields if value(got, path) != value(want, path)]


async def _answer(target: str, request: bytes) -> bytes:
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        result: bytes = await channel.unary_unary(ROUTE_METHOD)(request, timeout=60)
        return result


async def _p50_us(target: str, method: str, request: bytes, metadata: tuple[tuple[str, str], ...],
                  seconds: float, parse: bool) -> float:
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(
            method, response_deserializer=pb.RouteResponse.FromString if parse else None)
        for _ in range(200):  # warm: the channel, both sides' caches
            await call(request, metadata=metadata, timeout=60)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            await call(request, metadata=metadata, timeout=60)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30),
                    ("grpc.max_receive_message_length", 1 << 30)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("servers", nargs="+", type=ServerSpec.parse,
                        metavar="NAME=CONFIG[@CHECKOUT]")
    parser.add_argument("--router", default="mixtral")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per turn")
    args = parser.parse_args(argv)
    names = [s.name for s in args.servers]
    if len(set(names)) != len(names):
        parser.error(f"server names must differ, got {names}")
    started: list[ListeningProcess] = []
    try:
        started += [start_server(spec) for spec in args.servers]
        echo = ListeningProcess(python_file_command(echo_server.__file__), dict(os.environ),
                                "echo")
        started.append(echo)
        for process in started:  # stopped below whether or not it ever listens
            try:
                process.wait_ready(_START_TIMEOUT_S)
            except RuntimeError as exc:  # its own output says why
                raise SystemExit(str(exc)) from None
        servers = started[:-1]
        for spec, server in zip(args.servers, servers, strict=True):
            with RouterClient(server.target) as client:
                health = client.health()
            tree = f" from {spec.checkout}" if spec.checkout is not None else ""
            print(f"{spec.name}: moe-router {health.version} on {health.device}, "
                  f"{spec.config}{tree}")
        request = route_request(servers[0].target, args.router, args.tokens, args.dtype)
        first = servers[0].label
        answers = {s.label: asyncio.run(_answer(s.target, request)) for s in servers}
        for name, answer in answers.items():
            differ = differences(answer, answers[first])
            if differ:
                raise SystemExit(f"{name} answers differently from {first} "
                                 f"({', '.join(differ)}): not the same routing, so the "
                                 "times are not comparable")
        echo_metadata = ((echo_server.RESPONSE_BYTES_KEY, str(len(answers[first]))),)
        print(f"{args.router}, {args.tokens} x {args.dtype}: {len(request)} request bytes, "
              f"{len(answers[first])} answer bytes; p50 us, one caller")
        p50s: dict[str, list[float]] = {s.label: [] for s in started}
        for round_number in range(args.rounds):
            for s in started:
                if s is echo:
                    figure = asyncio.run(_p50_us(s.target, echo_server.ECHO_METHOD, request,
                                                 echo_metadata, args.seconds, parse=False))
                else:
                    figure = asyncio.run(_p50_us(s.target, ROUTE_METHOD, request, (),
                                                 args.seconds, parse=True))
                p50s[s.label].append(figure)
            print(f"round {round_number}: "
                  + ", ".join(f"{n} {v[-1]:.0f}" for n, v in p50s.items()), flush=True)
        floor = statistics.median(p50s["echo"])
        for name, figures in p50s.items():
            median = statistics.median(figures)
            print(f"{name:>12}: median {median:.0f} us, {median / floor:.3f}x the echo, "
                  f"rounds {min(figures):.0f}-{max(figures):.0f}")
    finally:
        for s in started:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
