"""``moe-router serve | route | stats | bench | simulate | describe | healthcheck``.

Every mistake and every failure is one line on stderr and a non-zero exit, never a
traceback: a bad argument or config exits 2 (as argparse does), a failed call or run
exits 1. The commands import only what they need, so ``--help`` and the client
commands stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from moe_router import __version__

__all__ = ["main", "build_parser"]

#: Exit status of a usage mistake (argparse's) and of a failed call or run.
USAGE_ERROR, FAILED = 2, 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line: ``moe-router route: --tokens: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _bounded_int(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
    """Restart this process once with the malloc tuning in its environment (Linux only).

    A launcher concern: glibc reads the variables only at process start, so the CLI
    entry execs itself with them (:mod:`moe_router.config.environment` decides whether
    and with what; any variable the caller already set wins).
    """
    from moe_router.config.environment import malloc_reexec_environment

    env = malloc_reexec_environment()
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "moe_router", *argv], env)


def _cmd_serve(args: argparse.Namespace) -> int:
    from moe_router.config import load_config
    from moe_router.doors.server import serve
    from moe_router.errors import RouterConfigurationError

    overrides = {}
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.device is not None:
        overrides["server.device"] = args.device
    try:
        return serve(load_config(args.config, overrides=overrides))
    except (RouterConfigurationError, OSError) as exc:
        # A bad config or a taken port: one clear line, not a traceback.
        print(f"moe-router: {exc}", file=sys.stderr)
        return USAGE_ERROR


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from moe_router_client import RouterClient

    return RouterClient(args.target, api_key=args.api_key, timeout=args.timeout)


def _cmd_route(args: argparse.Namespace) -> int:
    import numpy as np

    with _client(args) as client:
        described = {r.name: r for r in client.list_routers()}
        if args.router not in described:
            raise _Failure(f"unknown router '{args.router}'; the server hosts "
                           f"{sorted(described)}")
        dim = described[args.router].input_dim
        rng = np.random.default_rng(args.seed)
        hidden = rng.standard_normal((args.tokens, dim), dtype=np.float32)
        payload: object = hidden
        if args.dtype == "float16":
            payload = hidden.astype(np.float16)
        elif args.dtype == "bfloat16":  # numpy has no bf16; torch is here on a server install
            import torch

            payload = torch.from_numpy(hidden).to(torch.bfloat16)
        result = client.route(args.router, payload, layer=args.layer)
    if args.json:
        print(
            json.dumps(
                {
                    "expert_indices": result.expert_indices.tolist(),
                    "expert_weights": result.expert_weights.tolist(),
                    "num_experts_per_token": result.num_experts_per_token.tolist(),
                }
            )
        )
        return 0
    print(f"router {args.router} layer {args.layer}: {args.tokens} tokens of dim {dim}")
    print(f"{'token':>5}  {'experts':<32} weights")
    for t in range(args.tokens):
        n = int(result.num_experts_per_token[t])
        experts = " ".join(str(int(e)) for e in result.expert_indices[t, :n])
        weights = " ".join(f"{w:.4f}" for w in result.expert_weights[t, :n])
        print(f"{t:>5}  {experts:<32} {weights}")
    info = result.info
    print(
        f"version {info.router_version}  cache_hit {info.cache_hit}  "
        f"batch {info.batch_requests} calls/{info.batch_tokens} tokens  "
        f"queue {info.queue_time_us} us  compute {info.compute_time_us} us"
    )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats(args.router)
    header = (
        f"{'router':<14}{'requests':>10}{'tokens':>10}{'errors':>8}{'balance':>9}"
        f"{'avg k':>7}{'p50 ms':>9}{'p99 ms':>9}{'cache hit':>10}{'breaker':>11}"
    )
    print(header)
    for s in stats:
        cache = f"{s.cache.hit_rate:.2%}" if s.cache is not None else "-"
        breaker = s.breaker.state if s.breaker is not None else "-"
        print(
            f"{s.router:<14}{s.requests:>10}{s.tokens:>10}{s.errors:>8}"
            f"{s.load_balance_score:>9.3f}{s.avg_experts_per_token:>7.2f}"
            f"{s.latency.p50_ms:>9.3f}{s.latency.p99_ms:>9.3f}{cache:>10}{breaker:>11}"
        )
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from moe_router.analysis.placement import plan_placement
    from moe_router.analysis.simulator import RoutingSimulator

    if args.top_k > args.experts:
        raise _Usage(f"--top-k: must be <= --experts ({args.experts}), got {args.top_k}")
    sim = RoutingSimulator(args.experts, args.tokens, args.top_k, seed=args.seed)
    routing = sim.simulate_skewed(args.skew) if args.skew > 0 else sim.simulate_uniform()
    balance = sim.analyze_load_balance(routing)
    cost = sim.estimate_communication_cost(routing, args.devices, hidden_dim=args.hidden_dim)
    plan = plan_placement(
        balance["tokens_per_expert"], args.devices, redundant_slots=args.redundant
    )
    if args.json:
        print(
            json.dumps(
                {"load_balance": balance, "communication": cost, "placement": plan.to_dict()},
                indent=2,
                default=str,
            )
        )
        return 0
    print(_simulation_summary(args, balance, cost, plan.to_dict()))
    return 0


def _simulation_summary(args: argparse.Namespace, balance: dict, cost: dict,
                        plan: dict) -> str:
    """The simulation as a few readable lines (``--json`` gives every figure)."""
    load = [int(x) for x in balance["tokens_per_expert"]]
    lines = [
        f"{args.tokens} tokens, top-{args.top_k} of {args.experts} experts, skew {args.skew}, "
        f"{args.devices} devices",
        f"load balance  Jain {_figure(balance, 'load_balance_score')}  "
        f"max/mean {_figure(balance, 'max_mean_ratio')}  "
        f"idle experts {_figure(balance, 'idle_experts')}  "
        f"busiest expert {max(range(len(load)), key=load.__getitem__)} ({max(load)} tokens), "
        f"idlest {min(range(len(load)), key=load.__getitem__)} ({min(load)} tokens)",
    ]
    scalars = {k: v for k, v in cost.items() if isinstance(v, (int, float))}
    lines.append("all-to-all    " + "  ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()))
    plan_scalars = {k: v for k, v in plan.items() if isinstance(v, (int, float))}
    lines.append("placement     " + "  ".join(f"{k} {_fmt(v)}" for k, v in plan_scalars.items()))
    return "\n".join(lines)


def _figure(figures: dict, key: str) -> str:
    value = figures.get(key)
    return "-" if value is None else _fmt(value)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_bench(args: argparse.Namespace) -> int:
    from moe_router.analysis.service_bench import run_from_cli

    return run_from_cli(args)


def _cmd_describe(args: argparse.Namespace) -> int:
    from moe_router.errors import RouterConfigurationError
    from moe_router.loading.checkpoints import describe_entry

    try:
        print(describe_entry(args.model_dir, args.part, args.name), end="")
    except RouterConfigurationError as exc:
        raise _Usage(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(prog="moe-router", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moe-router {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # every flag's help shows its default

    p = sub.add_parser("serve", help="run the gRPC server", formatter_class=defaults)
    p.add_argument("--config", default=None,
                   help="config.yaml path (default: $DYNAMIC_MOE_CONFIG or the embedded one)")
    p.add_argument("--port", type=_bounded_int(0), default=None,
                   help="gRPC port, 0 picks a free one (default: server.port)")
    p.add_argument("--host", default=None, help="address to listen on (default: server.host)")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda or cuda:N (default: server.device)")
    p.set_defaults(func=_cmd_serve, reexec=True)

    for name, func, helptext in (
        ("route", _cmd_route, "route random hidden states through a running server"),
        ("stats", _cmd_stats, "print a running server's per-router statistics"),
    ):
        p = sub.add_parser(name, help=helptext, formatter_class=defaults)
        p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
        p.add_argument("--api-key", default=None, help="API key, when the server needs one")
        p.add_argument("--timeout", type=_positive_float, default=30.0,
                       help="deadline of each call in seconds")
        if name == "route":
            p.add_argument("--router", default="mixtral", help="router name (see ListRouters)")
            p.add_argument("--tokens", type=_bounded_int(1), default=8,
                           help="tokens to route")
            p.add_argument("--layer", type=_bounded_int(0), default=0, help="MoE layer")
            p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                           default="float32", help="dtype of the hidden states sent")
            p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
            p.add_argument("--json", action="store_true", help="print the answer as JSON")
        else:
            p.add_argument("--router", default=None, help="one router (default: all)")
        p.set_defaults(func=func)

    p = sub.add_parser("simulate", help="simulate routing load, all-to-all cost, placement",
                       formatter_class=defaults)
    p.add_argument("--experts", type=_bounded_int(1), default=64, help="experts E")
    p.add_argument("--tokens", type=_bounded_int(1), default=4096, help="tokens routed")
    p.add_argument("--top-k", type=_bounded_int(1), default=8, help="experts per token k")
    p.add_argument("--skew", type=_non_negative_float, default=1.0,
                   help="Zipf skew of expert popularity (0: uniform)")
    p.add_argument("--devices", type=_bounded_int(1), default=8,
                   help="devices the experts are placed on")
    p.add_argument("--hidden-dim", type=_bounded_int(1), default=4096,
                   help="hidden size, for the all-to-all bytes")
    p.add_argument("--redundant", type=_bounded_int(0), default=0,
                   help="redundant expert slots the placement may add")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("bench", help="measure the service against its peers",
                       formatter_class=defaults)
    p.add_argument("--preset", choices=("default", "quick"), default="default",
                   help="what to measure and for how long")
    p.add_argument("--target", default=None, help="benchmark a running server instead")
    p.add_argument("--output-dir", default="benchmark_results",
                   help="where the report, its JSON twin and the plots go")
    p.add_argument("--tokens", type=_bounded_int(1), nargs="+", default=None,
                   help="token counts per call (default: the preset's)")
    p.add_argument("--concurrency", type=_bounded_int(1), nargs="+", default=None,
                   help="concurrent calls (default: the preset's)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=None,
                   help="dtypes of the hidden states (default: the preset's)")
    p.add_argument("--duration", type=_positive_float, default=None,
                   help="timed seconds per cell (default: the preset's)")
    p.add_argument("--event-loop-cpu", type=_bounded_int(0), default=None,
                   help="pin the bench server's event loop (server.event_loop_cpu) and the "
                   "echo's alike to this CPU")
    p.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                   help="OLD.json: after the run, print what got faster or slower than that "
                   "run's service_bench.json; OLD.json NEW.json: compare two without running")
    p.set_defaults(func=_cmd_bench, reexec=True)

    p = sub.add_parser("describe", help="print the router entry a Hugging Face model "
                       "directory implies (YAML for config.yaml)", formatter_class=defaults)
    p.add_argument("model_dir", help="directory with config.json and safetensors")
    p.add_argument("--part", default=None, help="which router, for models with more than "
                   "one (e.g. deepseek_v4: routed | hash)")
    p.add_argument("--name", default=None, help="router name (default: the model_type)")
    p.set_defaults(func=_cmd_describe)

    from moe_router.doors.healthcheck import add_healthcheck_command

    add_healthcheck_command(sub)
    return parser


class _Usage(Exception):
    """A mistake in the arguments that argparse cannot see (exit 2)."""


class _Failure(Exception):
    """A command that could not do its job (exit 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moe-router`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "reexec", False):
        _reexec_with_malloc_tuning(argv)
    prog = f"moe-router {args.command}"
    try:
        return int(args.func(args) or 0)
    except _Usage as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED
    except Exception as exc:  # noqa: BLE001 - every failure is one line, never a traceback
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR if _is_usage(exc) else FAILED


def _is_usage(exc: Exception) -> bool:
    """Whether ``exc`` says the arguments were wrong (the server's or our own checks)."""
    from moe_router.errors import RouterConfigurationError, ValidationError

    if isinstance(exc, (RouterConfigurationError, ValidationError)):
        return True
    try:
        from moe_router_client.errors import InvalidArgumentError, NotFoundError
    except ImportError:  # pragma: no cover - the client ships with the server
        return False
    return isinstance(exc, (InvalidArgumentError, NotFoundError))


def _one_line(exc: Exception) -> str:
    """The error's message on one line: a client error's status and details, else str()."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if code is not None and isinstance(details, str):
        name = getattr(code, "name", str(code))
        text = f"{name}: {details}"
        if name == "UNAVAILABLE" and "connect" in details.lower():
            text += " (is the server running at --target?)"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
