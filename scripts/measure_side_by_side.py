"""Two or more servers measured side by side: Route p50 of one caller, through the gRPC
door (with the echo beside them) or the co-located door.

    python scripts/measure_side_by_side.py NAME=CONFIG[@CHECKOUT] ... [--door grpc]
        [--router mixtral] [--tokens 1] [--dtype float32] [--rounds 4] [--seconds 2]

Each ``NAME=CONFIG`` starts ``moe-router serve --config CONFIG --port 0`` (metrics and health
on free ports too); ``@CHECKOUT`` runs it from another source tree (a ``git worktree`` of
the commit to compare against), so a change is measured against the code before it on
the same machine, at the same time. One caller then times closed-loop Route calls of the
same hidden states against each server in turn, round after round (``--seconds`` each),
and prints every round's p50, the medians and their ratios: ``make bench`` judges one
build against its floors, this judges builds against each other, which ``--compare`` of
two runs cannot do within the noise of a shared machine (README "Benchmarks").

``--door grpc`` (default): raw grpc.aio calls, answers parsed as the bench's client
parses them, with the bench's echo server (the transport floor) taking its turn too;
``--callers N`` makes each turn N closed-loop callers on one channel. Every gRPC turn
also reads the server's CPU clock (``moe_router.analysis.server_cpu``): the calls a
second and the server's CPU per call are printed after the p50s. Under many callers on
a few cores the CPU per call is what bounds the calls a second, and it is steadier from
round to round than a p50.
``--door colocated``: the blocking ``CoLocatedClient`` with the hidden states in a shared
buffer, as the bench's 1-caller co-located cells; ratios are to the first server.

Before timing, every server must give the same answer for the hidden states (minus the
request id and the measured times): a change that moved an answer is not a speed-up.
``--rounding RTOL`` lets float answers differ by that much, relatively, for a change to
the arithmetic itself (a new kernel); the chosen experts must still be the same.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np

from moe_router.analysis import echo_server
from moe_router.analysis.load_client import ListeningProcess, python_file_command
from moe_router.analysis.server_cpu import ServerCpu, read_cpu
from moe_router_client import CoLocatedClient, RouterClient, RouteResult
from moe_router_client.tensors import from_wire, to_wire
from moe_router_client.v1 import router_pb2 as pb

ROUTE_METHOD = "/moe_router.v1.RouterService/Route"
_START_TIMEOUT_S = 180.0
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30),
                    ("grpc.max_receive_message_length", 1 << 30)]


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


def hidden_states(target: str, router: str, tokens: int, dtype: str) -> np.ndarray:
    """Seeded hidden states [tokens, D] of the router's input dim (asked of the server),
    float32 or the client's numpy bfloat16."""
    with RouterClient(target) as client:
        dims = {r.name: r.input_dim for r in client.list_routers()}
    if router not in dims:
        raise SystemExit(f"router '{router}' is not served; the servers host {sorted(dims)}")
    hidden = np.random.default_rng(0).standard_normal((tokens, dims[router]), np.float32)
    return hidden.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else hidden


def route_request(router: str, hidden: np.ndarray) -> bytes:
    """The serialized RouteRequest every server gets over gRPC."""
    request = pb.RouteRequest(router=router, layer=0, skip_cache=True)
    to_wire(hidden, out=request.hidden_states)
    return request.SerializeToString()


def differences(answer: bytes, expected: bytes, rounding: float = 0.0) -> list[str]:
    """The RouteResponse fields (``info.*`` for RoutingInfo's) in which ``answer``
    differs from ``expected``, leaving out what differs between any two calls: the
    request id and the measured times. ``rounding``: float tensors and scalars may differ
    by this much, relatively (a change to the arithmetic); the rest must be equal."""
    got, want = pb.RouteResponse.FromString(answer), pb.RouteResponse.FromString(expected)
    for info in (got.info, want.info):
        info.request_id = ""
        info.queue_time_us = info.compute_time_us = 0

    def same(a: Any, b: Any) -> bool:
        if a == b:
            return True
        if not rounding:
            return False
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=rounding)
        if isinstance(a, pb.Tensor) and a.dtype == b.dtype == pb.FLOAT32 and a.shape == b.shape:
            return close_arrays(from_wire(a), from_wire(b), rounding)
        return False

    def differing(a: Any, b: Any, prefix: str = "") -> list[str]:
        return [prefix + f.name for f in a.DESCRIPTOR.fields
                if f.name != "info" and not same(getattr(a, f.name), getattr(b, f.name))]

    return differing(got.info, want.info, "info.") + differing(got, want)


def close_arrays(got: Any, want: Any, rounding: float) -> bool:
    """Whether two float arrays of one shape are equal to ``rounding``, relatively."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=rounding, atol=0.0))


async def _answer(target: str, request: bytes) -> bytes:
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        result: bytes = await channel.unary_unary(ROUTE_METHOD)(request, timeout=60)
        return result


@dataclass(frozen=True)
class Turn:
    """One server's turn: p50 of every timed call, calls a second, server CPU per call
    (None where its clock could not be read or the turn had too few calls)."""

    p50_us: float
    per_s: float
    cpu_us: float | None


async def _turn(target: str, method: str, request: bytes, metadata: tuple[tuple[str, str], ...],
                seconds: float, parse: bool, callers: int, pid: int) -> Turn:
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(
            method, response_deserializer=pb.RouteResponse.FromString if parse else None)
        for _ in range(200):  # warm: the channel, both sides' caches
            await call(request, metadata=metadata, timeout=60)
        times: list[float] = []
        end = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < end:
                started = time.perf_counter()
                await call(request, metadata=metadata, timeout=60)
                times.append(time.perf_counter() - started)

        before, opened = read_cpu(pid), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        after, closed = read_cpu(pid), time.perf_counter()
    cpu = None if before is None or after is None else \
        ServerCpu.between(before, after, len(times), callers).us_per_call
    return Turn(statistics.median(times) * 1e6, len(times) / (closed - opened), cpu)


def colocated_differences(got: RouteResult, expected: RouteResult,
                          rounding: float = 0.0) -> list[str]:
    """What differs between two co-located answers (the arrays' bytes and the routing
    scalars; not the request id or the times); the weights to ``rounding``, relatively."""
    names = ["expert_indices", "expert_weights", "num_experts_per_token"]
    differ = [n for n in names if np.asarray(getattr(got, n)).tobytes()
              != np.asarray(getattr(expected, n)).tobytes()]
    if rounding and "expert_weights" in differ and close_arrays(
            got.expert_weights, expected.expert_weights, rounding):
        differ.remove("expert_weights")
    return differ + [f"info.{n}" for n in ("tokens_per_expert", "router_version")
                     if getattr(got.info, n) != getattr(expected.info, n)]


def colocated_p50_us(client: CoLocatedClient, router: str, buffer: np.ndarray,
                     seconds: float) -> float:
    """One blocking caller's p50 through the co-located door (hidden states in a shared
    buffer, as the bench's co-located cells)."""
    for _ in range(200):
        client.route(router, buffer, skip_cache=True)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        client.route(router, buffer, skip_cache=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def time_grpc(servers: list[ListeningProcess], echo: ListeningProcess, router: str,
              hidden: np.ndarray, rounds: int, seconds: float, callers: int = 1,
              rounding: float = 0.0) -> dict[str, list[Turn]]:
    """Every server's and the echo's turn per round over gRPC, after checking that the
    servers answer alike."""
    request = route_request(router, hidden)
    first = servers[0].label
    answers = {s.label: asyncio.run(_answer(s.target, request)) for s in servers}
    for name, answer in answers.items():
        differ = differences(answer, answers[first], rounding)
        if differ:
            raise SystemExit(f"{name} answers differently from {first} ({', '.join(differ)}): "
                             "not the same routing, so the times are not comparable")
    echo_metadata = ((echo_server.RESPONSE_BYTES_KEY, str(len(answers[first]))),)
    who = "one caller" if callers == 1 else f"{callers} callers"
    print(f"gRPC door: {len(request)} request bytes, {len(answers[first])} answer bytes; "
          f"p50 us, {who}")
    turns: dict[str, list[Turn]] = {s.label: [] for s in [*servers, echo]}
    for round_number in range(rounds):
        for s in [*servers, echo]:
            if s is echo:
                turn = asyncio.run(_turn(s.target, echo_server.ECHO_METHOD, request,
                                         echo_metadata, seconds, False, callers, s.proc.pid))
            else:
                turn = asyncio.run(_turn(s.target, ROUTE_METHOD, request, (), seconds, True,
                                         callers, s.proc.pid))
            turns[s.label].append(turn)
        _print_round(round_number, {n: [t.p50_us for t in ts] for n, ts in turns.items()})
    return turns


def time_colocated(servers: list[ListeningProcess], router: str, hidden: np.ndarray,
                   rounds: int, seconds: float, rounding: float = 0.0) -> dict[str, list[float]]:
    """Every server's p50 per round through the co-located door (no echo: its floor is
    routing in-process, which ``make bench`` measures), after checking that they answer
    alike."""
    clients = {s.label: CoLocatedClient(s.target, fallback=False, timeout=60) for s in servers}
    try:
        buffers = {}
        for name, client in clients.items():
            buffers[name] = client.shared_buffer(hidden.shape, hidden.dtype)
            buffers[name][...] = hidden
        first = servers[0].label
        answers = {n: c.route(router, buffers[n], skip_cache=True) for n, c in clients.items()}
        for name, answer in answers.items():
            differ = colocated_differences(answer, answers[first], rounding)
            if differ:
                raise SystemExit(f"{name} answers differently from {first} "
                                 f"({', '.join(differ)}): not the same routing, so the times "
                                 "are not comparable")
        print("co-located door, hidden states in a shared buffer; p50 us, one blocking caller")
        p50s: dict[str, list[float]] = {name: [] for name in clients}
        for round_number in range(rounds):
            for name, client in clients.items():
                p50s[name].append(colocated_p50_us(client, router, buffers[name], seconds))
            _print_round(round_number, p50s)
        return p50s
    finally:
        for client in clients.values():
            client.close()


def _cpu_figures(figures: list[float | None]) -> str:
    known = [f for f in figures if f is not None]
    if not known:
        return "not given (clock not readable here, or too few calls a turn)"
    return (f"median {statistics.median(known):.0f} us a call, rounds "
            f"{min(known):.0f}-{max(known):.0f}")


def _print_round(round_number: int, p50s: dict[str, list[float]]) -> None:
    print(f"round {round_number}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in p50s.items()),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("servers", nargs="+", type=ServerSpec.parse,
                        metavar="NAME=CONFIG[@CHECKOUT]")
    parser.add_argument("--door", choices=("grpc", "colocated"), default="grpc")
    parser.add_argument("--router", default="mixtral")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per turn")
    parser.add_argument("--callers", type=int, default=1,
                        help="closed-loop callers per turn (gRPC door)")
    parser.add_argument("--rounding", type=float, default=0.0, metavar="RTOL",
                        help="let the servers' float answers differ by this much, relatively "
                             "(a change to the arithmetic); the experts must still agree")
    args = parser.parse_args(argv)
    if args.callers < 1 or (args.callers > 1 and args.door != "grpc"):
        parser.error(f"--callers: a positive count, and only with --door grpc; got "
                     f"{args.callers} with --door {args.door}")
    names = [s.name for s in args.servers]
    if len(set(names)) != len(names):
        parser.error(f"server names must differ, got {names}")
    started = [start_server(spec) for spec in args.servers]
    try:
        echo = None
        if args.door == "grpc":
            echo = ListeningProcess(python_file_command(echo_server.__file__),
                                    dict(os.environ), "echo")
            started.append(echo)
        for process in started:  # stopped below whether or not it ever listens
            try:
                process.wait_ready(_START_TIMEOUT_S)
            except RuntimeError as exc:  # its own output says why
                raise SystemExit(str(exc)) from None
        servers = started[:len(args.servers)]
        for spec, server in zip(args.servers, servers, strict=True):
            with RouterClient(server.target) as client:
                health = client.health()
            tree = f" from {spec.checkout}" if spec.checkout is not None else ""
            print(f"{spec.name}: moe-router {health.version} on {health.device}, "
                  f"{spec.config}{tree}")
        hidden = hidden_states(servers[0].target, args.router, args.tokens, args.dtype)
        print(f"{args.router}, {args.tokens} x {args.dtype}")
        turns: dict[str, list[Turn]] = {}
        if echo is not None:
            turns = time_grpc(servers, echo, args.router, hidden, args.rounds, args.seconds,
                              args.callers, args.rounding)
            p50s = {name: [t.p50_us for t in ts] for name, ts in turns.items()}
            floor, floor_name = statistics.median(p50s["echo"]), "the echo"
        else:
            p50s = time_colocated(servers, args.router, hidden, args.rounds, args.seconds,
                                  args.rounding)
            floor, floor_name = statistics.median(p50s[servers[0].label]), servers[0].label
        for name, figures in p50s.items():
            median = statistics.median(figures)
            print(f"{name:>12}: median {median:.0f} us, {median / floor:.3f}x {floor_name}, "
                  f"rounds {min(figures):.0f}-{max(figures):.0f}")
        for name, ts in turns.items():
            print(f"{name:>12}: {statistics.median(t.per_s for t in ts):.0f} calls/s, "
                  f"server CPU {_cpu_figures([t.cpu_us for t in ts])}")
    finally:
        for process in started:
            process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
