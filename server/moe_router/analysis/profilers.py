"""FLOPProfiler and ComparisonProfiler: analytic FLOPs of routing next to measured time.

FLOP model of one routing call over T tokens of width D, E experts, k_max slots, A
real assignments (a multiply-add counts 2):

    gate           2 * T * in * out (+ T * out with bias) for every nn.Linear in the router
                   (the [E, D] gate: 2*T*D*E; an MLP router: each of its layers)
    scoring        c * T * E, c = 5 for softmax (max, subtract, exp, sum, divide),
                   4 for sigmoid (negate, exp, add, divide)
    selection      T * E * max(1, ceil(log2 k_max)): top-k with a k-element heap, one
                   pass over E scores at ceil(log2 k) comparisons each
    normalization  2 * A (sum and divide of the kept weights)
    experts        2 * m * A * D * D_ff when an expert width D_ff is given, m = matmuls
                   per expert (2 for an up/down MLP, 3 for SwiGLU); the static top-k_max
                   figure uses T * k_max in place of A
    combine        2 * A * D (weighted sum of expert outputs), with the experts

The model is the token-choice one; for expert-choice and Soft MoE it is an estimate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moe_router.analysis.simulator import load_balance_metrics
from moe_router.errors import DynamicMoEError, ProfilingError
from moe_router.routing.base import FLOAT_DTYPES, RouterBase
from moe_router.routing.kinds import ROUTER_KINDS, Construction, RoutingMethod
from moe_router.routing.output import RouterOutput
from moe_router.routing.router_config import RouterConfig, ScoringFunction

__all__ = ["FLOPProfiler", "ComparisonProfiler", "routing_flops", "build_router_from_dict"]

_SCORING_FLOPS = {ScoringFunction.SOFTMAX: 5, ScoringFunction.SIGMOID: 4}


def _positive_int_or_none(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfilingError(f"{name}: must be a positive integer or None, got {value!r}")
    return value


def routing_flops(
    router: RouterBase, num_tokens: int, assignments: int,
    expert_ffn_dim: int | None = None, expert_matmuls: int = 2,
) -> dict[str, int]:
    """Analytic FLOPs of routing ``num_tokens`` tokens with ``assignments`` real
    assignments (model in the module docstring); expert keys only with ``expert_ffn_dim``."""
    t, e, d = num_tokens, router.num_experts, router.hidden_size
    k_max = router.k_range[1]
    gate = sum(2 * t * m.in_features * m.out_features + (t * m.out_features if m.bias is not None
                                                         else 0)
               for m in router.modules() if isinstance(m, nn.Linear))
    scoring = _SCORING_FLOPS.get(router.config.scoring, 5) * t * e
    selection = t * e * max(1, math.ceil(math.log2(k_max)))
    normalization = 2 * assignments
    flops = {
        "gate_flops": gate,
        "scoring_flops": scoring,
        "selection_flops": selection,
        "normalization_flops": normalization,
        "routing_flops": gate + scoring + selection + normalization,
    }
    if expert_ffn_dim is not None:
        per_assignment = 2 * expert_matmuls * d * expert_ffn_dim
        flops["expert_flops"] = per_assignment * assignments
        flops["static_expert_flops"] = per_assignment * t * k_max
        flops["combine_flops"] = 2 * assignments * d
        flops["total_flops"] = flops["routing_flops"] + flops["expert_flops"] \
            + flops["combine_flops"]
    return flops


def _check_inputs(router: object, hidden_states: object) -> None:
    if not isinstance(router, RouterBase):
        raise ProfilingError(f"router: must be a moe_router RouterBase, got "
                             f"{type(router).__name__}")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dtype not in FLOAT_DTYPES \
            or hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != router.hidden_size:
        shape = list(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else None
        raise ProfilingError(
            f"hidden_states: must be a float tensor [T, {router.hidden_size}] or "
            f"[B, S, {router.hidden_size}], got {type(hidden_states).__name__} shape {shape}"
        )


def _timed_routes(router: RouterBase, x: torch.Tensor, runs: int, warmup: int
                  ) -> tuple[list[float], RouterOutput]:
    """Route ``x`` warmup + runs times under no_grad; (latencies ms, last output)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    out: RouterOutput | None = None
    latencies: list[float] = []
    try:
        with torch.no_grad():
            for i in range(warmup + runs):
                sync()
                start = time.perf_counter()
                out = router(x)
                sync()
                if i >= warmup:
                    latencies.append((time.perf_counter() - start) * 1e3)
    except DynamicMoEError as exc:
        raise ProfilingError(f"routing failed while profiling: {exc}") from exc
    assert out is not None
    return latencies, out


class FLOPProfiler:
    """Profile FLOP usage in dynamic routing: analytic FLOPs next to measured time.

    expert_ffn_dim / expert_matmuls: expert size for the expert-FLOP figures (default
    none: routing only). num_runs / warmup_runs: timed and untimed routing calls per
    profile; the time reported is the median. Profiling routes real calls, so a
    stateful router's statistics and balancing bias move as they would in serving.
    """

    def __init__(self, expert_ffn_dim: int | None = None, expert_matmuls: int = 2,
                 num_runs: int = 5, warmup_runs: int = 1) -> None:
        self.expert_ffn_dim = _positive_int_or_none(expert_ffn_dim, "expert_ffn_dim")
        if _positive_int_or_none(expert_matmuls, "expert_matmuls") is None:
            raise ProfilingError("expert_matmuls: must be a positive integer, got None")
        self.expert_matmuls = expert_matmuls
        if _positive_int_or_none(num_runs, "num_runs") is None:
            raise ProfilingError("num_runs: must be a positive integer, got None")
        self.num_runs = num_runs
        if isinstance(warmup_runs, bool) or not isinstance(warmup_runs, int) or warmup_runs < 0:
            raise ProfilingError(f"warmup_runs: must be an integer >= 0, got {warmup_runs!r}")
        self.warmup_runs = warmup_runs
        self.profiles: list[dict[str, Any]] = []

    def profile_routing(self, router: RouterBase, hidden_states: torch.Tensor,
                        expert_ffn_dim: int | None = None) -> dict[str, Any]:
        """Profile ``router`` on ``hidden_states`` [T, D] or [B, S, D].

        Returns the FLOP breakdown (see the module docstring), ``num_tokens``,
        ``assignments``, ``avg_experts_per_token``, ``expert_flops_saved_fraction``
        (1 - A / (T * k_max)), ``time_ms`` (median) and ``achieved_flops_per_s``
        (routing FLOPs / time). ``expert_ffn_dim`` overrides the profiler's.
        """
        _check_inputs(router, hidden_states)
        ffn = _positive_int_or_none(expert_ffn_dim, "expert_ffn_dim") or self.expert_ffn_dim
        latencies, out = _timed_routes(router, hidden_states, self.num_runs, self.warmup_runs)
        num_tokens = int(out.num_experts_per_token.numel())
        per_token = out.num_experts_per_token.reshape(-1).long()
        assignments = int(per_token.sum())
        k_min, k_max = router.k_range
        flops = routing_flops(router, num_tokens, assignments, ffn, self.expert_matmuls)
        time_ms = statistics.median(latencies)
        profile: dict[str, Any] = {
            "router": type(router).__name__,
            "num_tokens": num_tokens,
            "hidden_dim": router.hidden_size,
            "num_experts": router.num_experts,
            "k_min": k_min,
            "k_max": k_max,
            "assignments": assignments,
            "avg_experts_per_token": assignments / num_tokens if num_tokens else 0.0,
            "min_experts_per_token": int(per_token.min()) if num_tokens else 0,
            "max_experts_per_token": int(per_token.max()) if num_tokens else 0,
            "expert_flops_saved_fraction": 1.0 - assignments / (num_tokens * k_max)
            if num_tokens else 0.0,
            "expert_ffn_dim": ffn,
            **flops,
            "time_ms": time_ms,
            "achieved_flops_per_s": flops["routing_flops"] / (time_ms / 1e3)
            if time_ms > 0 else float("inf"),
            "latencies_ms": latencies,
            "tokens_per_expert": out.tokens_per_expert.detach().cpu().tolist(),
            "dropped_tokens": out.dropped_tokens,
        }
        self.profiles.append(profile)
        return profile

    def get_summary(self) -> dict[str, Any]:
        """Totals over every profile so far (zeros before the first)."""
        n = len(self.profiles)
        tokens = sum(p["num_tokens"] for p in self.profiles)
        assignments = sum(p["assignments"] for p in self.profiles)
        static = sum(p["num_tokens"] * p["k_max"] for p in self.profiles)
        routing = sum(p["routing_flops"] for p in self.profiles)
        time_ms = sum(p["time_ms"] for p in self.profiles)
        summary: dict[str, Any] = {
            "num_profiles": n,
            "total_tokens": tokens,
            "total_assignments": assignments,
            "total_routing_flops": routing,
            "total_time_ms": time_ms,
            "achieved_flops_per_s": routing / (time_ms / 1e3) if time_ms > 0 else 0.0,
            "avg_experts_per_token": assignments / tokens if tokens else 0.0,
            "expert_flops_saved_fraction": 1.0 - assignments / static if static else 0.0,
            "routing_flops_per_token": routing / tokens if tokens else 0.0,
        }
        with_experts = [p for p in self.profiles if "expert_flops" in p]
        if with_experts:
            summary["total_expert_flops"] = sum(p["expert_flops"] for p in with_experts)
            summary["total_static_expert_flops"] = sum(p["static_expert_flops"]
                                                       for p in with_experts)
        return summary

    def reset(self) -> None:
        """Forget every profile."""
        self.profiles.clear()


def build_router_from_dict(spec: Mapping[str, Any], hidden_dim: int, seed: int = 0
                           ) -> RouterBase:
    """A router from ``{"kind": ..., **params}`` for tokens of width ``hidden_dim``.

    ``kind`` is a :class:`RoutingMethod` value (default ``top_k``); its class comes from
    the kind table. Kinds built from dimensions (``dynamic``, ``adaptive``) take their
    class's arguments (``num_experts``, ``min_experts``, ``max_experts``, ...); the others
    take RouterConfig fields (``num_experts``, ``top_k``, ``scoring``, ...) plus their own
    constructor arguments (e.g. ``slots_per_expert``). An optional ``name`` is ignored
    here. Parameters are initialised from ``seed``.
    """
    params = {k: v for k, v in spec.items() if k not in ("kind", "name")}
    try:
        kind = RoutingMethod(spec.get("kind", "top_k"))
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in RoutingMethod)
        raise ProfilingError(f"kind: must be one of {allowed}, got {spec.get('kind')!r}") \
            from None
    entry = ROUTER_KINDS[kind]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if entry.construction is Construction.DIMENSIONS:  # params are its arguments
                router: RouterBase = entry.router_class()(input_dim=hidden_dim, **params)
                return router
            own = {k: params.pop(k) for k in list(params) if k in entry.arguments}
            config = RouterConfig(hidden_size=hidden_dim, routing_method=kind, **params)
            router = entry.construct(config, own)
            return router
    except (DynamicMoEError, TypeError) as exc:
        raise ProfilingError(f"cannot build a {kind.value!r} router from {dict(spec)}: {exc}") \
            from exc


class ComparisonProfiler:
    """Compare static vs dynamic MoE routing on the same tokens, side by side.

    Each strategy is profiled with a :class:`FLOPProfiler` (same expert size, runs and
    warmup) and its per-expert load analysed with
    :func:`moe_router.analysis.simulator.load_balance_metrics`.
    """

    def __init__(self, expert_ffn_dim: int | None = None, num_runs: int = 5,
                 warmup_runs: int = 1, seed: int = 0) -> None:
        self._profiler = FLOPProfiler(expert_ffn_dim=expert_ffn_dim, num_runs=num_runs,
                                      warmup_runs=warmup_runs)
        self.seed = int(seed)
        self.results: dict[str, dict[str, Any]] = {}

    def compare_routing_strategies(
        self, configs: Sequence[Mapping[str, Any] | RouterBase], test_data: torch.Tensor
    ) -> dict[str, dict[str, Any]]:
        """Profile every strategy in ``configs`` on ``test_data`` [T, D] or [B, S, D].

        ``configs``: router instances, or dicts for :func:`build_router_from_dict`
        (``{"name": "static-top4", "kind": "top_k", "num_experts": 8, "top_k": 4}``).
        Returns (and keeps for the report) one entry per strategy, keyed by its name
        (dict ``name``, else ``<index>:<class>``): experts per token, FLOPs, expert FLOPs
        saved vs a static top-k_max MoE, ``assignments_vs_first`` (expert work relative to
        the first strategy, usually the static baseline), latency and load balance.
        """
        if not isinstance(test_data, torch.Tensor) or test_data.dim() not in (2, 3) \
                or test_data.dtype not in FLOAT_DTYPES:
            raise ProfilingError("test_data: must be a float tensor [T, D] or [B, S, D]")
        if isinstance(configs, (Mapping, RouterBase)) or not isinstance(configs, Sequence) \
                or not configs:
            raise ProfilingError("configs: must be a non-empty list of dicts or routers")
        routers: list[tuple[str, RouterBase]] = []
        for i, config in enumerate(configs):
            if isinstance(config, RouterBase):
                routers.append((f"{i}:{type(config).__name__}", config))
            elif isinstance(config, Mapping):
                router = build_router_from_dict(config, test_data.shape[-1], self.seed)
                routers.append((str(config.get("name", f"{i}:{type(router).__name__}")),
                                router.to(test_data.device).eval()))
            else:
                raise ProfilingError(
                    f"configs[{i}]: must be a dict or a RouterBase, got {type(config).__name__}"
                )
        names = [name for name, _ in routers]
        if len(set(names)) != len(names):
            raise ProfilingError(f"configs: strategy names must be unique, got {names}")

        results: dict[str, dict[str, Any]] = {}
        first_assignments: int | None = None
        for name, router in routers:
            profile = self._profiler.profile_routing(router, test_data)
            balance = load_balance_metrics(torch.tensor(profile["tokens_per_expert"]))
            if first_assignments is None:
                first_assignments = profile["assignments"]
            results[name] = {
                **{k: v for k, v in profile.items() if k != "latencies_ms"},
                "k_range": (profile["k_min"], profile["k_max"]),
                "latency_p50_ms": profile["time_ms"],
                "latency_mean_ms": statistics.fmean(profile["latencies_ms"]),
                "assignments_vs_first": profile["assignments"] / first_assignments
                if first_assignments else 0.0,
                "load_balance_score": balance["load_balance_score"],
                "coefficient_of_variation": balance["coefficient_of_variation"],
                "max_mean_ratio": balance["max_mean_ratio"],
            }
        self.results = results
        return results

    def generate_comparison_report(self) -> str:
        """Markdown table of the last comparison, one row per strategy."""
        if not self.results:
            raise ProfilingError("no comparison yet: call compare_routing_strategies first")
        with_experts = any("expert_flops" in r for r in self.results.values())
        header = ["strategy", "router", "k range", "experts/token (min-max)",
                  "expert FLOPs saved vs static top-k_max", "expert work vs first",
                  "routing MFLOPs"]
        header += ["expert MFLOPs"] if with_experts else []
        header += ["p50 ms", "achieved routing GFLOP/s", "load balance (Jain)", "CV", "dropped"]
        lines = ["# Routing strategy comparison", "",
                 f"Tokens: {next(iter(self.results.values()))['num_tokens']}. "
                 "FLOP model: see moe_router.analysis.profilers.", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, r in self.results.items():
            row = [name, r["router"], f"{r['k_min']}-{r['k_max']}",
                   f"{r['avg_experts_per_token']:.3f} ({r['min_experts_per_token']}-"
                   f"{r['max_experts_per_token']})",
                   f"{100 * r['expert_flops_saved_fraction']:.1f}%",
                   f"{r['assignments_vs_first']:.3f}x",
                   f"{r['routing_flops'] / 1e6:.4g}"]
            if with_experts:
                row.append(f"{r['expert_flops'] / 1e6:.4g}" if "expert_flops" in r else "")
            row += [f"{r['latency_p50_ms']:.4g}", f"{r['achieved_flops_per_s'] / 1e9:.4g}",
                    f"{r['load_balance_score']:.3f}", f"{r['coefficient_of_variation']:.3f}",
                    str(r["dropped_tokens"])]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"
