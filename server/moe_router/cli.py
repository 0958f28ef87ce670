"""``moe-router serve | route | stats | bench | simulate | describe``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


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
        return 2


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from moe_router_client import RouterClient

    return RouterClient(args.target, api_key=args.api_key, timeout=args.timeout)


def _cmd_route(args: argparse.Namespace) -> int:
    import numpy as np

    with _client(args) as client:
        described = {r.name: r for r in client.list_routers()}
        if args.router not in described:
            print(
                f"unknown router '{args.router}'; the server hosts {sorted(described)}",
                file=sys.stderr,
            )
            return 2
        dim = described[args.router].input_dim
        rng = np.random.default_rng(args.seed)
        hidden = rng.standard_normal((args.tokens, dim), dtype=np.float32)
        if args.dtype == "float16":
            hidden = hidden.astype(np.float16)
        result = client.route(args.router, hidden, layer=args.layer)
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

    sim = RoutingSimulator(args.experts, args.tokens, args.top_k, seed=args.seed)
    routing = sim.simulate_skewed(args.skew) if args.skew > 0 else sim.simulate_uniform()
    balance = sim.analyze_load_balance(routing)
    cost = sim.estimate_communication_cost(routing, args.devices, hidden_dim=args.hidden_dim)
    plan = plan_placement(
        balance["tokens_per_expert"], args.devices, redundant_slots=args.redundant
    )
    print(
        json.dumps(
            {"load_balance": balance, "communication": cost, "placement": plan.to_dict()},
            indent=2,
            default=str,
        )
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from moe_router.analysis.service_bench import run_from_cli

    return run_from_cli(args)


def _cmd_describe(args: argparse.Namespace) -> int:
    from moe_router.errors import RouterConfigurationError
    from moe_router.loading.checkpoints import describe_entry

    try:
        print(describe_entry(args.model_dir, args.part, args.name), end="")
    except RouterConfigurationError as exc:
        print(f"moe-router describe: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="moe-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument(
        "--config",
        default=None,
        help="config.yaml path (default: $DYNAMIC_MOE_CONFIG or the embedded default)",
    )
    p.add_argument("--port", type=int, default=None, help="gRPC port (0 picks a free one)")
    p.add_argument("--host", default=None)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_serve, reexec=True)

    for name, func, helptext in (
        ("route", _cmd_route, "route random hidden states"),
        ("stats", _cmd_stats, "print per-router statistics"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--target", default="127.0.0.1:50051")
        p.add_argument("--api-key", default=None)
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--router", default=None if name == "stats" else "mixtral")
        if name == "route":
            p.add_argument("--tokens", type=int, default=8)
            p.add_argument("--layer", type=int, default=0)
            p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("simulate", help="simulate routing load, all-to-all cost, placement")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--hidden-dim", type=int, default=4096)
    p.add_argument("--redundant", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("bench", help="measure the service against its peers")
    p.add_argument("--preset", choices=("default", "quick"), default="default")
    p.add_argument("--target", default=None, help="benchmark a running server instead")
    p.add_argument("--output-dir", default="benchmark_results")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts per call (default: the preset's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="concurrent calls (default: the preset's)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--duration", type=float, default=None, help="timed seconds per cell")
    p.set_defaults(func=_cmd_bench, reexec=True)

    p = sub.add_parser("describe", help="print the router entry a Hugging Face model "
                       "directory implies (YAML for config.yaml)")
    p.add_argument("model_dir", help="directory with config.json and safetensors")
    p.add_argument("--part", default=None, help="which router, for models with more than "
                   "one (e.g. deepseek_v4: routed | hash)")
    p.add_argument("--name", default=None, help="router name (default: the model_type)")
    p.set_defaults(func=_cmd_describe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moe-router`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "reexec", False):
        _reexec_with_malloc_tuning(argv)
    return int(args.func(args) or 0)
