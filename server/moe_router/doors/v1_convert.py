"""moe_router.v1 proto <-> domain: the only place the v1 door's messages are built or read.

Requests decode into a :class:`RouteCall` whose tensors stay views of the received bytes;
Stats entries and ListRouters entries are encoded from the chain's domain values
(:class:`RouterFigures`, the hosted router). Route's answers are written to their wire
bytes directly (:mod:`moe_router.doors.response_wire`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import grpc
import torch

from moe_router.chain.backend import AT_ONCE, AfterAnswer, RouteCall, RouteOptions
from moe_router.chain.figures import RouterFigures
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.request_wire import RouteRequestView, TensorView
from moe_router.doors.security import caller_identity
from moe_router.errors import NotFoundError, ValidationError
from moe_router_client.tensors import TensorCodecError, dtype_name, from_parts
from moe_router_client.v1 import router_pb2 as pb

__all__ = [
    "ACCEPTED_DTYPES",
    "MAX_CLAIMED_ELEMENTS",
    "MAX_RANK",
    "MAX_REQUEST_ID_CHARS",
    "describe_router",
    "peer_host",
    "request_id_of",
    "request_to_call",
    "router_stats",
]

ACCEPTED_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)
"""Wire dtypes hidden_states (and the estimator inputs) may have."""

MAX_RANK = 8
"""Most dimensions a request tensor may have (hidden_states has 2 or 3)."""

MAX_CLAIMED_ELEMENTS = 1 << 40
"""Most elements a tensor's shape may claim, counting only its non-zero dimensions: an
empty tensor of shape [2^62, 2^62, 0] holds nothing but no tensor library can describe
it, so it is refused here, at the edge, instead of failing deep inside."""

MAX_REQUEST_ID_CHARS = 128
"""Longest request id a caller may send (it is echoed in answers and logs)."""

_EXTRA_INPUTS = ("attention_weights", "logits", "gradients")


def peer_host(peer: str) -> str:
    """The caller's address without its port (``ipv4:127.0.0.1:5123`` -> ``ipv4:127.0.0.1``),
    so a caller without a key keeps one rate-limit bucket across connections."""
    head, sep, tail = peer.rpartition(":")
    return head if sep and tail.isdigit() else peer


def _decode(tensor: TensorView, field: str, float_only: bool = False) -> torch.Tensor:
    shape = tensor.shape
    if len(shape) > MAX_RANK:
        raise ValidationError(
            f"{field}: shape has {len(shape)} dimensions; at most {MAX_RANK}"
        )
    if any(dim < 0 for dim in shape):
        raise ValidationError(f"{field}: shape {list(shape)} has a negative dimension")
    claimed = math.prod(dim for dim in shape if dim)
    if claimed > MAX_CLAIMED_ELEMENTS:
        raise ValidationError(
            f"{field}: shape {list(shape)} claims {claimed} elements (the product of its "
            f"non-zero dimensions); at most {MAX_CLAIMED_ELEMENTS}"
        )
    if float_only and tensor.dtype not in ACCEPTED_DTYPES:
        raise ValidationError(
            f"{field}: dtype {dtype_name(tensor.dtype)} is not accepted; expected FLOAT32, "
            "FLOAT16 or BFLOAT16"
        )
    try:
        return from_parts(tensor.dtype, shape, tensor.data, as_torch=True)
    except TensorCodecError as exc:
        raise ValidationError(f"{field}: {exc}") from exc


def request_id_of(request: RouteRequestView) -> str:
    """The caller's request id when it is usable (at most MAX_REQUEST_ID_CHARS printable
    characters), else "" (the server then makes one up)."""
    request_id = request.message.request_id
    if len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isprintable():
        return request_id
    return ""


def request_to_call(
    request: RouteRequestView,
    chains: Mapping[str, HostedRouterChain],
    context: grpc.aio.ServicerContext,
    request_id: str,
    after_answer: AfterAnswer = AT_ONCE,
) -> RouteCall:
    """Decode a RouteRequest into a RouteCall; tensors stay views of the received bytes.

    ``request_id``: the call's id (the caller's, or one the server made up), used in
    the answer and in every error. ``after_answer``: the call's records the door runs
    once it has sent the answer.
    """
    if request.error:
        raise ValidationError(request.error)
    message = request.message
    if message.request_id and request_id != message.request_id:
        raise ValidationError(
            f"request_id: at most {MAX_REQUEST_ID_CHARS} printable characters, got "
            f"{len(message.request_id)} characters"
        )
    if not message.router:
        raise ValidationError(f"router: required; this server hosts {sorted(chains)}")
    if message.router not in chains:
        raise NotFoundError(
            f"unknown router '{message.router}'; this server hosts {sorted(chains)}"
        )
    if "hidden_states" not in request.tensors:
        raise ValidationError(
            "hidden_states: required, a [tokens, dim] or [batch, seq, dim] tensor"
        )
    extra = {
        name: _decode(request.tensors[name], name, float_only=True)
        for name in _EXTRA_INPUTS
        if name in request.tensors
    }
    input_ids = None
    if "input_ids" in request.tensors:
        input_ids = _decode(request.tensors["input_ids"], "input_ids")
    remaining = context.time_remaining()
    return RouteCall(
        router=message.router,
        layer=message.layer,
        hidden_states=_decode(request.tensors["hidden_states"], "hidden_states"),
        options=RouteOptions(
            return_router_logits=message.return_router_logits,
            return_losses=message.return_losses,
            skip_cache=message.skip_cache,
            seed=message.seed if message.HasField("seed") else None,
            extra_inputs=extra,
            input_ids=input_ids,
        ),
        deadline=None if remaining is None else time.monotonic() + remaining,
        request_id=request_id,
        peer=caller_identity() or peer_host(context.peer()),
        after_answer=after_answer,
    )


def router_stats(figures: RouterFigures) -> pb.RouterStats:
    """A router's Stats entry: requests, per-expert load by layer, latency, cache, breaker."""
    requests = figures.requests
    load = requests.tokens_per_expert
    latency = requests.latency
    stats = pb.RouterStats(
        router=figures.router,
        requests=requests.requests,
        tokens=requests.tokens,
        errors=requests.errors,
        tokens_per_expert=load,
        load_balance_score=requests.load_balance_score,
        usage_variance=requests.usage_variance,
        most_used_expert=max(range(len(load)), key=load.__getitem__) if load else -1,
        least_used_expert=min(range(len(load)), key=load.__getitem__) if load else -1,
        avg_experts_per_token=requests.avg_experts_per_token,
        dropped_tokens=requests.dropped_tokens,
        latency=pb.LatencySummary(
            p50_ms=latency.p50_ms,
            p95_ms=latency.p95_ms,
            p99_ms=latency.p99_ms,
            mean_ms=latency.mean_ms,
            samples=latency.samples,
        ),
        layers=[
            pb.LayerLoad(layer=i, tokens_per_expert=counts)
            for i, counts in enumerate(requests.expert_load)
        ],
    )
    if figures.cache is not None:
        c = figures.cache
        stats.cache.CopyFrom(
            pb.CacheStats(
                size=c.size,
                max_size=c.max_size,
                hit_count=c.hit_count,
                miss_count=c.miss_count,
                hit_rate=c.hit_rate,
                ttl_seconds=c.ttl_seconds,
                bytes=c.bytes,
                max_bytes=c.max_bytes,
                evictions=c.evictions,
            )
        )
    if figures.breaker is not None:
        b = figures.breaker
        stats.breaker.CopyFrom(
            pb.BreakerStats(
                state=b.state.value,
                failure_rate=b.failure_rate,
                slow_call_rate=b.slow_call_rate,
                rejected_calls=b.rejected_calls,
                transitions=b.transitions,
                retry_after_s=b.retry_after_s,
            )
        )
    return stats


def describe_router(chain: HostedRouterChain) -> pb.RouterDescription:
    """A router's ListRouters entry."""
    hosted = chain.hosted
    first = hosted.layers[0]
    low, high = first.k_range
    return pb.RouterDescription(
        name=chain.name,
        kind=hosted.spec.kind.value,
        num_experts=first.num_experts,
        layers=len(hosted.layers),
        input_dim=first.hidden_size,
        min_k=low,
        max_k=high,
        accepted_dtypes=ACCEPTED_DTYPES,
        version=hosted.versions[0],
        batches_across_requests=chain.batches_across_requests,
    )
