"""What ``moe-router bench`` measures: the benchmarked routers, the sweep, its time budget.

A :class:`BenchRouter` is a benchmarked router's geometry (a gate [E, D] with random
weights, one layer) and how it becomes a ``routers:`` entry of the bench server's
config.yaml; its ``kind`` is the one kind enum (:class:`moe_router.routing.RoutingMethod`),
limited to the two kinds the eager peer reimplements. A :class:`BenchPlan` is the sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from moe_router.errors import ValidationError
from moe_router.routing.kinds import RoutingMethod

__all__ = ["WireDtype", "BenchRouter", "MIXTRAL", "DEEPSEEK_V3", "BenchPlan", "PRESETS",
           "BENCH_KINDS", "service_config"]

BENCH_KINDS = frozenset({RoutingMethod.TOP_K, RoutingMethod.GROUPED_TOP_K})
"""The kinds the bench can host: the ones its eager in-process peer reimplements."""


class WireDtype(str, Enum):
    """Dtype of the hidden states sent."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class BenchRouter:
    """One benchmarked router: gate [E, D] with random weights, one layer.

    kind: ``top_k`` (softmax, renormalised) or ``grouped_top_k`` (DeepSeek-V3: sigmoid,
    top-2-sum group scores, correction bias, ``routed_scaling_factor``).
    """

    name: str
    kind: RoutingMethod
    input_dim: int
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        kind = next((k for k in BENCH_KINDS if k == self.kind), None)  # a member or its value
        if kind is None:
            allowed = ", ".join(sorted(repr(k.value) for k in BENCH_KINDS))
            raise ValidationError(f"kind: the bench hosts {allowed}, got {self.kind!r}")
        object.__setattr__(self, "kind", kind)

    def config_entry(self) -> dict[str, Any]:
        """Its ``routers:`` entry in the bench server's config.yaml."""
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind.value,
                                 "input_dim": self.input_dim, "num_experts": self.num_experts,
                                 "top_k": self.top_k, "renormalize": True, "layers": 1,
                                 "weights": {"init": "random", "seed": 0}}
        if self.kind is RoutingMethod.TOP_K:
            entry["scoring"] = "softmax"
        else:
            entry.update(scoring="sigmoid", n_group=self.n_group, topk_group=self.topk_group,
                         group_score="top2_sum", use_correction_bias=True,
                         routed_scaling_factor=self.routed_scaling_factor)
        return entry


MIXTRAL = BenchRouter("mixtral", RoutingMethod.TOP_K, 4096, 8, 2)
DEEPSEEK_V3 = BenchRouter("deepseek-v3", RoutingMethod.GROUPED_TOP_K, 7168, 256, 8, n_group=8,
                          topk_group=4, routed_scaling_factor=2.5)


def _positive_ints(value: Sequence[int], name: str) -> tuple[int, ...]:
    values = tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValidationError(f"{name}: must be a non-empty list of positive integers, "
                              f"got {list(value)!r}")
    return values


@dataclass(frozen=True)
class BenchPlan:
    """The sweep and its time budget.

    Every (router, dtype, tokens) gets the in-process peers and the service + echo at each
    ``concurrency`` level; levels above 1 only up to ``max_concurrent_tokens`` tokens (at
    4096 x 7168 floats a request is 117 MB). Each load cell warms up ``warmup_s`` then
    times ``duration_s``; in-process peers time at least ``inprocess_s``. The malloc test
    sends ``malloc_message_bytes`` each way for ``malloc_duration_s`` per variant and round.
    ``inprocess_s`` is shared by the eager and matmul peers, timed in turns.
    """

    routers: tuple[BenchRouter, ...] = (MIXTRAL, DEEPSEEK_V3)
    tokens: tuple[int, ...] = (1, 16, 256, 4096)
    dtypes: tuple[WireDtype, ...] = (WireDtype.FLOAT32, WireDtype.BFLOAT16)
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_concurrent_tokens: int = 256
    warmup_s: float = 0.3
    duration_s: float = 1.2
    inprocess_s: float = 0.8
    malloc_message_bytes: int = 16 * 1024 * 1024
    malloc_duration_s: float = 1.5
    malloc_rounds: int = 2
    client_procs: int = 2

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "tokens", _positive_ints(self.tokens, "tokens"))
        set_(self, "concurrency", _positive_ints(self.concurrency, "concurrency"))
        try:
            set_(self, "dtypes", tuple(WireDtype(d) for d in self.dtypes))
        except ValueError:
            allowed = ", ".join(d.value for d in WireDtype)
            raise ValidationError(f"dtypes: each must be one of {allowed}, "
                                  f"got {list(self.dtypes)!r}") from None
        if not self.dtypes or not self.routers:
            raise ValidationError("dtypes, routers: must not be empty")
        for name in ("warmup_s", "duration_s", "inprocess_s", "malloc_duration_s"):
            if not getattr(self, name) > 0:
                raise ValidationError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_concurrent_tokens", "malloc_message_bytes", "malloc_rounds",
                     "client_procs"):
            _positive_ints((getattr(self, name),), name)

    def levels(self, tokens: int) -> list[int]:
        """The concurrency levels run at ``tokens`` tokens per call."""
        return [c for c in self.concurrency if c == 1 or tokens <= self.max_concurrent_tokens]


PRESETS: dict[str, BenchPlan] = {
    "default": BenchPlan(),
    "quick": BenchPlan(tokens=(16, 256), concurrency=(1, 4), warmup_s=0.1, duration_s=0.4,
                       inprocess_s=0.2, malloc_duration_s=0.5, malloc_rounds=1),
}


def service_config(plan: BenchPlan) -> dict[str, Any]:
    """The bench server's config: loopback, free ports, cache off, batching on, the plan's
    routers; the breaker's slow-call limit raised so long 4096-token calls never trip it."""
    loopback = {"host": "127.0.0.1", "port": 0}
    return {"server": {**loopback, "device": "auto", "drain_grace_s": 1.0},
            "metrics": {"enabled": True, **loopback},
            "health": {"enabled": True, **loopback},
            "cache": {"enabled": False},
            "batching": {"enabled": True},
            "breaker": {"slow_call_duration_ms": 600_000.0},
            "routers": [r.config_entry() for r in plan.routers]}
