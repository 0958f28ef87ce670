"""The in-process peers of ``moe-router bench``: our router, plain PyTorch routing, the matmul.

What a user would do instead of calling the service, measured side by side in one
process on the same hidden states and the same gate weights:

- **ours**: the very :class:`~moe_router.routing.base.RouterBase` module the server hosts,
  built from the bench config's entry by :func:`moe_router.loading.registry.build_router`
  and called as the module (``router(x)``: validate, logits, selection, normalisation,
  losses, counts) under ``torch.inference_mode``;
- **plain**: :func:`plain_route`, the routing a user writes by hand in eager PyTorch;
- **matmul**: ``x.float() @ W.T`` alone, the compute floor.

The three are timed in turns (:func:`time_interleaved`) so a noisy neighbour hits all
alike; ours / plain is the cost of our abstractions, plain / matmul the cost of the
selection math itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_router.analysis.bench_plan import BenchRouter, WireDtype
from moe_router.errors import ValidationError
from moe_router.routing.base import RouterBase
from moe_router.routing.kinds import RoutingMethod

__all__ = ["INPROCESS_PEERS", "InprocessRun", "hosted_router", "intra_op_threads", "plain_route",
           "run_inprocess", "time_interleaved"]

INPROCESS_PEERS = ("ours", "plain", "matmul")
"""The benchmark names of the in-process peers, in the order they are timed."""


def plain_route(x: torch.Tensor, weight: torch.Tensor, spec: BenchRouter,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing a user writes in plain eager PyTorch: x [T, D] -> (weights, indices) [T, k].

    Top-k: softmax of ``x.float() @ W.T``, top-k, renormalised. Grouped (DeepSeek-V3):
    sigmoid scores, selection on scores + bias [E] among the ``topk_group`` groups with the
    best top-2 sums, weights from the unbiased scores, renormalised, times the scale.
    """
    logits = x.float() @ weight.T  # [T, E]
    if spec.kind is RoutingMethod.TOP_K:
        weights, indices = logits.softmax(dim=-1).topk(spec.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), indices
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias
    grouped = choice.view(x.shape[0], spec.n_group, -1)  # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    kept = group_scores.topk(spec.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, kept, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(x.shape[0], -1)
    indices = choice.masked_fill(expert_mask == 0, float("-inf")).topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    return weights / weights.sum(dim=-1, keepdim=True) * spec.routed_scaling_factor, indices


def hosted_router(spec: BenchRouter, config_path: Path, device: torch.device) -> RouterBase:
    """Layer 0 of router ``spec.name`` as the server builds it from ``config_path``: the
    same config entry, loader, random-weight seed and device placement."""
    from moe_router.config import load_config
    from moe_router.loading.registry import build_router

    config = load_config(config_path)
    entry = next((r for r in config.routers if r.name == spec.name), None)
    if entry is None:
        raise ValidationError(f"{config_path}: has no router {spec.name!r}; expected one of "
                              f"{[r.name for r in config.routers]}")
    return build_router(entry, 0, device)


def time_interleaved(calls: dict[str, Callable[[], object]], min_time_s: float,
                     device: torch.device, min_calls: int = 3) -> dict[str, list[float]]:
    """Latencies (ms) of each call, taken in turns (so a noisy neighbour hits all alike)
    after one warmup each, for ``min_time_s`` in all and at least ``min_calls`` each,
    under ``torch.inference_mode`` (a device synchronise after each call on CUDA)."""
    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    latencies: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            timed(fn)
        stop = time.perf_counter() + min_time_s
        while len(latencies[next(iter(calls))]) < min_calls or time.perf_counter() < stop:
            for name, fn in calls.items():
                latencies[name].append(timed(fn))
    return latencies


@dataclass(frozen=True)
class InprocessRun:
    """The latencies (ms) of each peer at one cell, and whether ours and plain agreed.

    latencies: :data:`INPROCESS_PEERS` -> per-call ms. disagreement: None when our
    router and the plain routing chose the same experts for every token, else what
    differed (the comparison would then be of different work).
    """

    latencies: dict[str, list[float]]
    disagreement: str | None


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (0: left as it is) while inside."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_inprocess(spec: BenchRouter, router: RouterBase, dtype: WireDtype, tokens: int,
                  min_time_s: float, device: torch.device, threads: int = 0) -> InprocessRun:
    """Time our ``router``, :func:`plain_route` with its gate weights, and the bare matmul
    on ``tokens`` seeded hidden states [tokens, D] in ``dtype`` on ``device``, on
    ``threads`` intra-op threads (0: torch's default)."""
    with intra_op_threads(threads):
        return _run_inprocess(spec, router, dtype, tokens, min_time_s, device)


def _run_inprocess(spec: BenchRouter, router: RouterBase, dtype: WireDtype, tokens: int,
                   min_time_s: float, device: torch.device) -> InprocessRun:
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.input_dim, generator=gen).to(device)
    x = x.to(torch.bfloat16) if dtype is WireDtype.BFLOAT16 else x
    x32 = x.float()
    weight = router.gate.weight.detach()
    bias = getattr(router, "e_score_correction_bias", None)
    with torch.inference_mode():
        ours = router(x)
        _, plain_indices = plain_route(x, weight, spec, bias)
    disagreement = None
    if not torch.equal(ours.expert_indices.to(plain_indices.dtype).cpu(), plain_indices.cpu()):
        rows = int((ours.expert_indices.cpu() != plain_indices.int().cpu()).any(-1).sum())
        disagreement = (f"{spec.name} {dtype.value} T={tokens}: our router and plain routing "
                        f"chose different experts for {rows} of {tokens} tokens")
    latencies = time_interleaved({"ours": lambda: router(x),
                                  "plain": lambda: plain_route(x, weight, spec, bias),
                                  "matmul": lambda: x32 @ weight.T}, min_time_s, device)
    return InprocessRun(latencies, disagreement)
