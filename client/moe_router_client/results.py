"""What the client returns: frozen dataclasses decoded from the service's responses.

Plain Python and numpy (or torch) values, never protobuf messages, so callers need not
know the wire format. ``route`` answers a :class:`RouteResult` (token-centric:
``expert_indices`` / ``expert_weights`` ``[..., k_max]`` padded with -1 / 0,
``num_experts_per_token`` ``[...]``); ``stats`` a list of :class:`RouterStats`;
``health`` a :class:`HealthReport`; ``list_routers`` a list of :class:`RouterInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from moe_router_client.frozen_init import fast_init
from moe_router_client.tensors import dtype_name, from_wire
from moe_router_client.v1 import router_pb2 as pb

__all__ = [
    "ServingState",
    "RouteInfo",
    "RouteResult",
    "LatencySummary",
    "CacheStats",
    "BreakerStats",
    "LayerLoad",
    "RouterStats",
    "RouterHealth",
    "HealthReport",
    "RouterInfo",
    "route_result_from_proto",
    "router_stats_from_proto",
    "health_from_proto",
    "router_info_from_proto",
]

ServingState = Literal["SERVING", "NOT_SERVING", "DEGRADED", "SERVING_STATUS_UNSPECIFIED"]


@fast_init
@dataclass(frozen=True)
class RouteInfo:
    """Scalars about one routed call (mirrors ``moe_router.v1.RoutingInfo``)."""

    aux_loss: float | None
    """Load-balancing auxiliary loss; None when the router computes none."""
    z_loss: float | None
    """Router z-loss; None when the router computes none."""
    tokens_per_expert: list[int]
    """Assignments per expert in this call, length num_experts."""
    dropped_tokens: int
    router_version: str
    cache_hit: bool
    batch_requests: int
    """How many requests shared this call's device pass."""
    batch_tokens: int
    """How many tokens that device pass routed."""
    queue_time_us: int
    compute_time_us: int
    request_id: str
    layer: int


@fast_init
@dataclass(frozen=True)
class RouteResult:
    """The routing answer for one call; arrays are numpy unless ``as_torch=True`` was asked.

    Token dims ``...`` are ``[T]`` for ``[T, D]`` inputs and ``[B, S]`` for ``[B, S, D]``.
    """

    expert_indices: Any
    """int32 ``[..., k_max]``: chosen experts, -1 where padded."""
    expert_weights: Any
    """float32 ``[..., k_max]``: combine weights, 0 where padded."""
    num_experts_per_token: Any
    """int32 ``[...]``: how many of the k_max slots are real."""
    complexity_scores: Any | None
    """float32 ``[...]`` (dynamic routers), else None."""
    router_logits: Any | None
    """float32 ``[..., num_experts]`` when ``return_router_logits``, else None."""
    dispatch_weights: Any | None
    """float32 ``[tokens, experts * slots]`` (Soft MoE), else None."""
    combine_weights: Any | None
    """float32 ``[tokens, experts * slots]`` (Soft MoE), else None."""
    expert_tokens: Any | None
    """int32 ``[experts, groups * capacity]`` (routers with ``pad_to_capacity``), else
    None: the flat token indices each expert processes, each capacity group's columns
    in token order, padded with -1."""
    expert_token_weights: Any | None
    """float32 ``[experts, groups * capacity]``: the combine weight of each of those
    (token, expert) pairs, 0 where padded; None without ``pad_to_capacity``."""
    info: RouteInfo


@dataclass(frozen=True)
class LatencySummary:
    """Server-side latency percentiles of a router's calls, in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    samples: int


@dataclass(frozen=True)
class CacheStats:
    """A router's response cache."""

    size: int
    max_size: int
    hit_count: int
    miss_count: int
    hit_rate: float
    ttl_seconds: float
    bytes: int
    max_bytes: int
    evictions: int


@dataclass(frozen=True)
class BreakerStats:
    """A router's circuit breaker; ``state`` is CLOSED, OPEN or HALF_OPEN."""

    state: str
    failure_rate: float
    slow_call_rate: float
    rejected_calls: int
    transitions: int
    retry_after_s: float


@dataclass(frozen=True)
class LayerLoad:
    """Cumulative assignments per expert for one MoE layer."""

    layer: int
    tokens_per_expert: list[int]


@dataclass(frozen=True)
class RouterStats:
    """One router's cumulative statistics; ``cache`` / ``breaker`` None when it has none."""

    router: str
    requests: int
    tokens: int
    errors: int
    tokens_per_expert: list[int]
    load_balance_score: float
    """Jain's index over tokens_per_expert: 1 even, 1/E when one expert takes all."""
    usage_variance: float
    most_used_expert: int
    least_used_expert: int
    avg_experts_per_token: float
    dropped_tokens: int
    latency: LatencySummary
    cache: CacheStats | None
    breaker: BreakerStats | None
    layers: list[LayerLoad]


@dataclass(frozen=True)
class RouterHealth:
    """One router's serving state and why."""

    router: str
    status: ServingState
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """The server's overall serving state, each router's, and what it runs on."""

    status: ServingState
    routers: list[RouterHealth]
    device: str
    version: str
    uptime_s: float


@dataclass(frozen=True)
class RouterInfo:
    """A hosted router as ``ListRouters`` describes it; dtypes by name (``FLOAT32``)."""

    name: str
    kind: str
    num_experts: int
    layers: int
    input_dim: int
    min_k: int
    max_k: int
    accepted_dtypes: list[str]
    version: str
    batches_across_requests: bool
    """False for routers whose decision couples tokens (batched per request only)."""


_OPTIONAL_TENSORS = ("complexity_scores", "router_logits", "dispatch_weights", "combine_weights",
                     "expert_tokens", "expert_token_weights")


def route_result_from_proto(response: pb.RouteResponse, as_torch: bool = False) -> RouteResult:
    """Decode a RouteResponse; tensors the server left unset become None."""
    info = response.info
    optional = {
        name: from_wire(getattr(response, name), as_torch) if response.HasField(name) else None
        for name in _OPTIONAL_TENSORS
    }
    return RouteResult(
        expert_indices=from_wire(response.expert_indices, as_torch),
        expert_weights=from_wire(response.expert_weights, as_torch),
        num_experts_per_token=from_wire(response.num_experts_per_token, as_torch),
        info=RouteInfo(
            aux_loss=info.aux_loss if info.HasField("aux_loss") else None,
            z_loss=info.z_loss if info.HasField("z_loss") else None,
            tokens_per_expert=list(info.tokens_per_expert),
            dropped_tokens=info.dropped_tokens,
            router_version=info.router_version,
            cache_hit=info.cache_hit,
            batch_requests=info.batch_requests,
            batch_tokens=info.batch_tokens,
            queue_time_us=info.queue_time_us,
            compute_time_us=info.compute_time_us,
            request_id=info.request_id,
            layer=info.layer,
        ),
        **optional,
    )


def _serving(status: int) -> ServingState:
    return cast(ServingState, pb.ServingStatus.Name(status))


def router_stats_from_proto(stats: pb.RouterStats) -> RouterStats:
    """Convert one RouterStats message."""
    lat, cache, breaker = stats.latency, stats.cache, stats.breaker
    return RouterStats(
        router=stats.router,
        requests=stats.requests,
        tokens=stats.tokens,
        errors=stats.errors,
        tokens_per_expert=list(stats.tokens_per_expert),
        load_balance_score=stats.load_balance_score,
        usage_variance=stats.usage_variance,
        most_used_expert=stats.most_used_expert,
        least_used_expert=stats.least_used_expert,
        avg_experts_per_token=stats.avg_experts_per_token,
        dropped_tokens=stats.dropped_tokens,
        latency=LatencySummary(lat.p50_ms, lat.p95_ms, lat.p99_ms, lat.mean_ms, lat.samples),
        cache=CacheStats(
            cache.size, cache.max_size, cache.hit_count, cache.miss_count, cache.hit_rate,
            cache.ttl_seconds, cache.bytes, cache.max_bytes, cache.evictions,
        ) if stats.HasField("cache") else None,
        breaker=BreakerStats(
            breaker.state, breaker.failure_rate, breaker.slow_call_rate, breaker.rejected_calls,
            breaker.transitions, breaker.retry_after_s,
        ) if stats.HasField("breaker") else None,
        layers=[LayerLoad(x.layer, list(x.tokens_per_expert)) for x in stats.layers],
    )


def health_from_proto(response: pb.HealthResponse) -> HealthReport:
    """Convert a HealthResponse."""
    return HealthReport(
        status=_serving(response.status),
        routers=[RouterHealth(r.router, _serving(r.status), r.detail) for r in response.routers],
        device=response.device,
        version=response.version,
        uptime_s=response.uptime_s,
    )


def router_info_from_proto(description: pb.RouterDescription) -> RouterInfo:
    """Convert one RouterDescription."""
    return RouterInfo(
        name=description.name,
        kind=description.kind,
        num_experts=description.num_experts,
        layers=description.layers,
        input_dim=description.input_dim,
        min_k=description.min_k,
        max_k=description.max_k,
        accepted_dtypes=[dtype_name(d) for d in description.accepted_dtypes],
        version=description.version,
        batches_across_requests=description.batches_across_requests,
    )
