"""The seed's ``create_optimized_router``: a router on the device pool, large batches split.

For per-token routers a large batch is split across the pool's workers and the answer
is identical to one call of the router (see :class:`OptimizedRouter`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch

from moe_router.chain.cache import process_rss_bytes
from moe_router.chain.pool import DevicePool
from moe_router.errors import RouterConfigurationError
from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput

__all__ = ["OptimizedRouter", "create_optimized_router"]


class OptimizedRouter:
    """A router run on the device pool, splitting large per-token batches.

    A batch is split when ``enable_parallel`` is on, it has at least
    ``2 * min_tokens_per_split`` tokens and carries no extra inputs, and the router is
    per-token, deterministic and stateless (not ``couples_tokens_now``, ``stochastic`` or
    ``stateful``). The chunks run on the pool; their per-token tensors are concatenated
    (bit-identical, the gate matmul being batch-invariant), per-expert counts summed, and
    the batch losses recomputed over the whole batch with the router's own
    ``select``/``compute_aux_loss``/``compute_z_loss``, so the answer equals one call's.
    (The router's running statistics count each chunk as a batch.) ``route`` blocks its
    caller; do not call it from the pool's own workers.
    """

    def __init__(self, router: RouterBase, enable_autoscaling: bool = True,
                 enable_parallel: bool = True, max_workers: int = 4, *, min_workers: int = 1,
                 min_tokens_per_split: int = 2048) -> None:
        if not isinstance(router, RouterBase):
            raise RouterConfigurationError(
                f"router: must be a moe_router RouterBase, got {type(router).__name__}"
            )
        if isinstance(min_tokens_per_split, bool) or not isinstance(min_tokens_per_split, int) \
                or min_tokens_per_split < 1:
            raise RouterConfigurationError(
                f"min_tokens_per_split: must be a positive integer, got {min_tokens_per_split!r}"
            )
        self.router = router
        self.enable_parallel = enable_parallel
        self.min_tokens_per_split = min_tokens_per_split
        self.pool = DevicePool(
            max_workers=max_workers, min_workers=min(min_workers, max_workers),
            autoscale=enable_autoscaling, name="moe-router-optimized",
        )
        self._lock = threading.Lock()
        self._calls = self._failed = self._split_calls = self._tokens = 0
        self._busy_s = 0.0

    def route(self, hidden_states: torch.Tensor, seed: int | None = None,
              **extra_inputs: torch.Tensor) -> RouterOutput:
        """Route hidden states [T, D] or [B, S, D] on the pool (split when worthwhile)."""
        started = time.perf_counter()
        grad = torch.is_grad_enabled()
        try:
            chunks = self._chunks(hidden_states, seed, extra_inputs)
            if chunks is None:
                output = self.pool.submit(self._forward, hidden_states, seed, grad,
                                          extra_inputs).result()
            else:
                futures = [self.pool.submit(self._forward, c, None, grad, {}) for c in chunks]
                output = self._merge(hidden_states, [f.result() for f in futures], grad)
        except BaseException:
            with self._lock:
                self._calls += 1
                self._failed += 1
            raise
        with self._lock:
            self._calls += 1
            self._split_calls += chunks is not None
            self._tokens += int(hidden_states.numel() // max(hidden_states.shape[-1], 1))
            self._busy_s += time.perf_counter() - started
        return output

    __call__ = route

    def get_optimization_stats(self) -> dict[str, Any]:
        """``performance`` (calls, tokens, latency), ``autoscaler`` (pool), ``memory_pool``."""
        with self._lock:
            done = self._calls - self._failed
            performance = {
                "total_calls": self._calls,
                "failed_calls": self._failed,
                "split_calls": self._split_calls,
                "tokens_routed": self._tokens,
                "avg_latency_ms": self._busy_s / done * 1e3 if done else None,
                "tokens_per_second": self._tokens / self._busy_s if self._busy_s else None,
                "parallel_enabled": self.enable_parallel,
            }
        return {"performance": performance,
                "autoscaler": dataclasses.asdict(self.pool.stats()),
                "memory_pool": _memory_pool_stats(self.router)}

    def close(self) -> None:
        """Stop the worker pool."""
        self.pool.shutdown(wait=True)

    def _chunks(self, hidden_states: torch.Tensor, seed: int | None,
                extra_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        router = self.router
        if (not self.enable_parallel or extra_inputs or seed is not None
                or router.couples_tokens_now or router.stochastic or router.stateful
                or hidden_states.dim() not in (2, 3)):
            return None
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        pieces = min(self.pool.stats().max_workers, flat.shape[0] // self.min_tokens_per_split)
        if pieces < 2:
            return None
        return list(flat.tensor_split(pieces))

    def _forward(self, hidden_states: torch.Tensor, seed: int | None, grad: bool,
                 extra_inputs: dict[str, torch.Tensor]) -> RouterOutput:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=hidden_states.device).manual_seed(seed)
        with torch.set_grad_enabled(grad):
            return self.router(hidden_states, generator=generator, **extra_inputs)

    def _merge(self, hidden_states: torch.Tensor, parts: list[RouterOutput],
               grad: bool) -> RouterOutput:
        """One call's answer from the answers of its token chunks (see class docstring)."""
        lead = tuple(hidden_states.shape[:-1])
        k_max = max(p.k_max for p in parts)
        indices = torch.cat([_pad(p.expert_indices, k_max, -1) for p in parts])
        weights = torch.cat([_pad(p.expert_weights, k_max, 0.0) for p in parts])
        logits = torch.cat([p.router_logits for p in parts])
        flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        aux_loss = z_loss = None
        if parts[0].aux_loss is not None:  # the chunks were asked for losses: so is the call
            with torch.set_grad_enabled(grad):
                selection = self.router.select(logits, flat_hidden, lead_shape=lead)
                aux_loss = self.router.compute_aux_loss(selection.probs, indices)
                z_loss = self.router.compute_z_loss(logits)
        scores = [p.complexity_scores for p in parts if p.complexity_scores is not None]
        return dataclasses.replace(
            parts[0],
            expert_indices=indices.reshape(*lead, k_max),
            expert_weights=weights.reshape(*lead, k_max),
            num_experts_per_token=torch.cat([p.num_experts_per_token for p in parts]).reshape(lead),
            router_logits=logits.reshape(*lead, -1),
            tokens_per_expert=torch.stack([p.tokens_per_expert for p in parts]).sum(0),
            dropped_tokens=sum(p.dropped_tokens for p in parts),
            aux_loss=aux_loss,
            z_loss=z_loss,
            complexity_scores=torch.cat(scores).reshape(lead) if scores else None,
        )




def create_optimized_router(router: RouterBase, enable_autoscaling: bool = True,
                            enable_parallel: bool = True, max_workers: int = 4,
                            **scaling_kwargs: Any) -> OptimizedRouter:
    """Run ``router`` on a pool of up to ``max_workers`` threads, started on demand.

    scaling_kwargs: ``min_workers`` (1, started up front), ``min_tokens_per_split`` (2048).
    """
    allowed = ("min_workers", "min_tokens_per_split")
    unknown = sorted(set(scaling_kwargs) - set(allowed))
    if unknown:
        raise RouterConfigurationError(
            f"scaling_kwargs: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return OptimizedRouter(router, enable_autoscaling, enable_parallel, max_workers,
                           **scaling_kwargs)




def _pad(tensor: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """Right-pad the last dim of [T, k] to ``width`` with ``fill``."""
    missing = width - tensor.shape[-1]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, missing), value=fill)




def _memory_pool_stats(router: RouterBase) -> dict[str, Any]:
    """The device allocator's pool (CUDA caching allocator) and the process RSS."""
    device = next(router.parameters()).device
    stats: dict[str, Any] = {"device": str(device), "rss_bytes": process_rss_bytes()}
    if device.type == "cuda":
        stats.update(
            allocated_bytes=torch.cuda.memory_allocated(device),
            reserved_bytes=torch.cuda.memory_reserved(device),
            peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
        )
    return stats
