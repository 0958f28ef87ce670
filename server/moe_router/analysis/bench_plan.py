"""What ``moe-router bench`` measures: the benchmarked routers, the sweep, its time budget.

A :class:`BenchRouter` is a benchmarked router's geometry (a gate [E, D] with random
weights, one layer) and how it becomes a ``routers:`` entry of the bench server's
config.yaml; its ``kind`` is the one kind enum (:class:`moe_router.routing.RoutingMethod`),
limited to the two kinds the plain-PyTorch peer reimplements. A :class:`BenchPlan` is the
sweep: token counts, callers, dtypes, the doors (client kinds, :class:`Transport`) and
the seconds per cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from moe_router.analysis.load_worker import (
    COLOCATED_BLOCKING_CLIENT_CLASS,
    COLOCATED_CLIENT_CLASS,
    Transport,
)
from moe_router.errors import ValidationError
from moe_router.routing.kinds import RoutingMethod

__all__ = ["WireDtype", "Transport", "BenchRouter", "MIXTRAL", "DEEPSEEK_V3", "BenchPlan",
           "PRESETS", "BENCH_KINDS", "service_config"]

BENCH_KINDS = frozenset({RoutingMethod.TOP_K, RoutingMethod.GROUPED_TOP_K})
"""The kinds the bench can host: the ones its plain-PyTorch in-process peer reimplements."""


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

    Every (router, dtype, tokens) gets the in-process peers (our router, plain PyTorch
    routing, the bare matmul) and, at each ``concurrency`` level, Route through each of
    ``transports`` and the gRPC echo; levels above 1 only up to ``max_concurrent_tokens``
    tokens (at 4096 x 7168 floats a request is 117 MB). On a CUDA host the in-process peers
    also run at ``gpu_tokens``. Each load cell warms up ``warmup_s`` then times
    ``duration_s`` in ``rounds`` parts, the doors and the echo taking turns round by round
    so that load drift on a shared machine hits all of them alike; the in-process peers,
    timed call by call in turns, share at least ``inprocess_s``.
    The malloc test sends ``malloc_message_bytes`` each way for ``malloc_duration_s`` per
    variant and round. ``colocated_client`` is the co-located door's client class
    (``module:Name``, see :mod:`moe_router.analysis.load_worker`), and
    ``colocated_blocking_client`` the blocking one a lone caller uses (one caller per
    load-client process: the 1-caller cells), as a serving stack's forward thread would;
    "" for the asyncio client everywhere.

    ``inprocess_threads``: torch intra-op threads of the in-process peers (0: torch's
    default). 1 by default: on a shared machine two OpenMP threads stall at every parallel
    region while another process holds a core, so the figure measured the neighbours (on
    the 2-core development machine at load 5, a 16 x 4096 fp32 gate matmul took 24-62 ms
    on two threads and 0.04-0.05 ms on one, and ours / plain at 256 tokens read 22x in
    one run and 62x in the next); one thread is also how a serving stack's own calling
    thread would route in-process.

    ``event_loop_cpu``: the bench server's ``server.event_loop_cpu``, and the echo servers
    pinned the same way, so that a pinned door is measured against a pinned floor.
    """

    routers: tuple[BenchRouter, ...] = (MIXTRAL, DEEPSEEK_V3)
    tokens: tuple[int, ...] = (1, 16, 256, 2048)
    dtypes: tuple[WireDtype, ...] = (WireDtype.FLOAT32, WireDtype.BFLOAT16)
    concurrency: tuple[int, ...] = (1, 4, 16)
    transports: tuple[Transport, ...] = (Transport.GRPC, Transport.COLOCATED)
    max_concurrent_tokens: int = 256
    gpu_tokens: tuple[int, ...] = (8192,)
    warmup_s: float = 0.3
    duration_s: float = 1.2
    inprocess_s: float = 1.0
    inprocess_threads: int = 1
    event_loop_cpu: int | None = None
    malloc_message_bytes: int = 16 * 1024 * 1024
    malloc_duration_s: float = 1.5
    malloc_rounds: int = 2
    rounds: int = 3
    client_procs: int = 2
    colocated_client: str = COLOCATED_CLIENT_CLASS
    colocated_blocking_client: str = COLOCATED_BLOCKING_CLIENT_CLASS

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "tokens", _positive_ints(self.tokens, "tokens"))
        set_(self, "concurrency", _positive_ints(self.concurrency, "concurrency"))
        set_(self, "gpu_tokens",
             _positive_ints(self.gpu_tokens, "gpu_tokens") if self.gpu_tokens else ())
        set_(self, "dtypes", _members(self.dtypes, WireDtype, "dtypes"))
        set_(self, "transports", _members(self.transports, Transport, "transports"))
        if not self.routers:
            raise ValidationError("routers: must not be empty")
        for name in ("warmup_s", "duration_s", "inprocess_s", "malloc_duration_s"):
            if not getattr(self, name) > 0:
                raise ValidationError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_concurrent_tokens", "malloc_message_bytes", "malloc_rounds",
                     "rounds", "client_procs"):
            _positive_ints((getattr(self, name),), name)
        if isinstance(self.inprocess_threads, bool) or not isinstance(
                self.inprocess_threads, int) or self.inprocess_threads < 0:
            raise ValidationError(f"inprocess_threads: must be an integer >= 0 (0: torch's "
                                  f"default), got {self.inprocess_threads!r}")
        if self.event_loop_cpu is not None and (isinstance(self.event_loop_cpu, bool) or not
                                                isinstance(self.event_loop_cpu, int)
                                                or self.event_loop_cpu < 0):
            raise ValidationError(f"event_loop_cpu: must be a CPU number >= 0 or None, got "
                                  f"{self.event_loop_cpu!r}")
        if ":" not in self.colocated_client:
            raise ValidationError(f"colocated_client: must be 'module:ClassName', got "
                                  f"{self.colocated_client!r}")
        if self.colocated_blocking_client and ":" not in self.colocated_blocking_client:
            raise ValidationError(f"colocated_blocking_client: must be 'module:ClassName' "
                                  f"or '', got {self.colocated_blocking_client!r}")

    def levels(self, tokens: int) -> list[int]:
        """The concurrency levels run at ``tokens`` tokens per call."""
        return [c for c in self.concurrency if c == 1 or tokens <= self.max_concurrent_tokens]


_Member = TypeVar("_Member", bound=Enum)


def _members(values: Sequence[Any], enum: type[_Member], name: str) -> tuple[_Member, ...]:
    try:
        members = tuple(enum(v) for v in values)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise ValidationError(f"{name}: each must be one of {allowed}, "
                              f"got {list(values)!r}") from None
    if not members:
        raise ValidationError(f"{name}: must not be empty")
    return tuple(dict.fromkeys(members))


PRESETS: dict[str, BenchPlan] = {
    "default": BenchPlan(),
    "quick": BenchPlan(tokens=(1, 256), dtypes=(WireDtype.FLOAT32,), concurrency=(1, 16),
                       warmup_s=0.1, duration_s=0.4, rounds=2, inprocess_s=0.3,
                       malloc_duration_s=0.5, malloc_rounds=1),
}


def service_config(plan: BenchPlan) -> dict[str, Any]:
    """The bench server's config: loopback, free ports, cache off, batching on, the plan's
    routers; the breaker's slow-call limit raised so long 2048-token calls never trip it.
    (When the co-located door needs a config section to open, it goes here.)"""
    loopback = {"host": "127.0.0.1", "port": 0}
    server: dict[str, Any] = {**loopback, "device": "auto", "drain_grace_s": 1.0}
    if plan.event_loop_cpu is not None:
        server["event_loop_cpu"] = plan.event_loop_cpu
    return {"server": server,
            "metrics": {"enabled": True, **loopback},
            "health": {"enabled": True, **loopback},
            "cache": {"enabled": False},
            "batching": {"enabled": True},
            "breaker": {"slow_call_duration_ms": 600_000.0},
            "routers": [r.config_entry() for r in plan.routers]}
