"""RoutingSimulator: synthetic routings, load-balance metrics and all-to-all communication cost.

Synthetic routings draw k distinct experts per token from a Zipf-like popularity
p_i ∝ 1 / (i + 1)^skew with the Gumbel-top-k trick (sampling without replacement in
one vectorised step, Kool et al. 2019). The analyses accept real routings too: a
``RouterOutput``, a ``[T, k]`` index tensor, or per-expert counts from the Stats RPC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moe_router.analysis.placement import PlacementPlan, contiguous_placement
from moe_router.errors import ValidationError
from moe_router.routing import functional as F
from moe_router.routing.output import RouterOutput

__all__ = ["RoutingSimulator", "RoutingLike", "load_balance_metrics"]

RoutingLike = RouterOutput | torch.Tensor | np.ndarray | Sequence[Any]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValidationError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def load_balance_metrics(counts: torch.Tensor) -> dict[str, Any]:
    """Balance figures of per-expert load ``counts`` [E] (assignments per expert).

    coefficient_of_variation: population std / mean; max_mean_ratio: max / mean;
    entropy: Shannon entropy (nats) of the load distribution c / sum(c), and
    normalized_entropy = entropy / ln(E); load_balance_score: Jain's index
    (sum c)^2 / (E * sum c^2), 1 when even, 1/E when one expert takes all.
    With no load at all every figure reads "perfectly balanced".
    """
    c = counts.detach().cpu().double()
    num_experts = int(c.numel())
    total = float(c.sum())
    mean = total / num_experts
    if total > 0:
        p = c / total
        entropy = float(torch.special.entr(p).sum())
        cv = float(c.std(unbiased=False)) / mean
        max_mean = float(c.max()) / mean
    else:
        entropy, cv, max_mean = math.log(num_experts), 0.0, 1.0
    integral = not counts.is_floating_point()
    return {
        "num_experts": num_experts,
        "total_assignments": int(total) if integral else total,
        "tokens_per_expert": counts.detach().cpu().tolist(),
        "mean_load": mean,
        "std_load": float(c.std(unbiased=False)),
        "min_load": float(c.min()),
        "max_load": float(c.max()),
        "idle_experts": int((c == 0).sum()),
        "coefficient_of_variation": cv,
        "max_mean_ratio": max_mean,
        "entropy": entropy,
        "normalized_entropy": entropy / math.log(num_experts) if num_experts > 1 else 1.0,
        "load_balance_score": F.load_balance_score(c),
    }


class RoutingSimulator:
    """Synthetic routing of ``num_tokens`` tokens to ``top_k`` of ``num_experts`` experts.

    Every draw comes from one ``torch.Generator`` seeded with ``seed``: the sequence of
    routings a simulator returns is reproducible.
    """

    def __init__(self, num_experts: int, num_tokens: int, top_k: int, seed: int = 0) -> None:
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.num_tokens = _positive_int(num_tokens, "num_tokens")
        self.top_k = _positive_int(top_k, "top_k")
        if self.top_k > self.num_experts:
            raise ValidationError(
                f"top_k: must be <= num_experts ({self.num_experts}), got {top_k}"
            )
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    # ----------------------------------------------------------------- simulation
    def expert_popularity(self, skew_factor: float) -> torch.Tensor:
        """Zipf-like popularity [E] float64: p_i ∝ 1 / (i + 1)^skew, summing to 1."""
        if not (isinstance(skew_factor, (int, float)) and math.isfinite(skew_factor)
                and skew_factor >= 0):
            raise ValidationError(
                f"skew_factor: must be a finite number >= 0, got {skew_factor!r}"
            )
        ranks = torch.arange(1, self.num_experts + 1, dtype=torch.float64)
        weights = ranks.pow(-float(skew_factor))
        return weights / weights.sum()

    def simulate_uniform(self) -> torch.Tensor:
        """Routing [T, k] int64: each token gets k distinct experts, all equally likely."""
        return self.simulate_skewed(0.0)

    def simulate_skewed(self, skew_factor: float) -> torch.Tensor:
        """Routing [T, k] int64 with k distinct experts per token under Zipf popularity.

        Expert 0 is the most popular; ``skew_factor`` 0 is uniform. Gumbel-top-k: the k
        largest of ``log p_i + Gumbel`` are an ordered sample without replacement from p.
        """
        log_p = self.expert_popularity(skew_factor).log().float()
        exponential = torch.empty(self.num_tokens, self.num_experts).exponential_(
            generator=self._generator
        )
        keys = log_p - exponential.log()  # -log(Exp(1)) is a standard Gumbel draw
        return torch.topk(keys, self.top_k, dim=-1).indices

    # ----------------------------------------------------------------- analysis
    def _routing_matrix(self, routing: RoutingLike) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(indices [T, k] or None, counts [E]) from any accepted routing form."""
        if isinstance(routing, RouterOutput):
            indices = routing.expert_indices.detach().cpu().reshape(-1, routing.k_max).long()
            return indices, routing.tokens_per_expert.detach().cpu()
        if isinstance(routing, torch.Tensor):
            data = routing.detach().cpu()
        else:
            try:
                data = torch.as_tensor(np.asarray(routing))
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"routing: cannot read {type(routing).__name__}") from exc
        if data.dim() == 1:
            if data.numel() == 0 or bool((data < 0).any()) or not bool(data.isfinite().all()):
                raise ValidationError("routing: per-expert counts must be non-empty and >= 0")
            return None, data
        if data.dim() != 2 or data.is_floating_point() or data.dtype == torch.bool:
            raise ValidationError(
                f"routing: expected integer expert indices [tokens, k] or per-expert counts "
                f"[E], got dtype {data.dtype} shape {list(data.shape)}"
            )
        indices = data.long()
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= self.num_experts):
            raise ValidationError(
                f"routing: expert indices must lie in [0, {self.num_experts}) "
                "(or -1 for an unused slot)"
            )
        return indices, F.tokens_per_expert(indices, self.num_experts)

    def analyze_load_balance(self, routing: RoutingLike) -> dict[str, Any]:
        """Load-balance figures (see :func:`load_balance_metrics`) of ``routing``.

        Dispatch on type and rank: a ``RouterOutput`` uses its ``tokens_per_expert``; a
        2-D integer tensor/array/nested list is a ``[T, k]`` routing (-1 = unused slot,
        indices < num_experts); a 1-D tensor/array/list is per-expert counts (any length,
        e.g. ``tokens_per_expert`` from the Stats RPC).
        """
        _, counts = self._routing_matrix(routing)
        return load_balance_metrics(counts)

    def estimate_communication_cost(
        self,
        routing: RoutingLike,
        num_devices: int,
        hidden_dim: int = 4096,
        dtype_bytes: int = 2,
        placement: Sequence[int] | PlacementPlan | None = None,
    ) -> dict[str, Any]:
        """All-to-all bytes of expert-parallel dispatch and combine for a per-token routing.

        Tokens live on devices in contiguous blocks (token t on device ``t * D // T``).
        Experts are placed contiguously (expert e on ``e * D // E``), by ``placement``
        (expert -> device list), or by a :class:`PlacementPlan` (a token uses a replica on
        its own device if there is one, else the expert's primary device). A token is sent
        ONCE per remote destination device, however many of its experts live there, as
        real all-to-all dispatchers (DeepEP, Megatron's alltoall) do; ``remote_assignments``
        gives the count without that de-duplication. Dispatch bytes = transfers *
        hidden_dim * dtype_bytes; the combine step sends the same volume back.
        """
        indices, _ = self._routing_matrix(routing)
        if indices is None:
            raise ValidationError(
                "routing: communication cost needs a per-token routing [T, k] or RouterOutput, "
                "not per-expert counts"
            )
        num_devices = _positive_int(num_devices, "num_devices")
        hidden_dim = _positive_int(hidden_dim, "hidden_dim")
        dtype_bytes = _positive_int(dtype_bytes, "dtype_bytes")
        num_experts = (routing.num_experts if isinstance(routing, RouterOutput)
                       else self.num_experts)
        primary, replica_mask = self._placement(placement, num_experts, num_devices)

        num_tokens = indices.shape[0]
        src = torch.arange(num_tokens) * num_devices // max(num_tokens, 1)  # [T]
        valid = indices >= 0
        expert = indices.clamp(min=0)
        dest = primary[expert]  # [T, k]
        if replica_mask is not None:
            local_copy = replica_mask[expert, src.unsqueeze(1).expand_as(expert)]
            dest = torch.where(local_copy, src.unsqueeze(1), dest)
        remote = valid & (dest != src.unsqueeze(1))
        hits = torch.zeros(num_tokens, num_devices + 1, dtype=torch.bool)
        hits.scatter_(1, torch.where(remote, dest, num_devices), True)
        hits = hits[:, :num_devices]  # [T, D]: token t is sent to device d
        traffic = torch.zeros(num_devices, num_devices, dtype=torch.int64)
        traffic.index_add_(0, src, hits.long())  # [src device, dst device] token transfers

        token_bytes = hidden_dim * dtype_bytes
        sent, received = traffic.sum(dim=1), traffic.sum(dim=0)
        transfers = int(traffic.sum())
        assignments = int(valid.sum())
        remote_assignments = int(remote.sum())
        return {
            "num_devices": num_devices,
            "num_tokens": num_tokens,
            "num_assignments": assignments,
            "local_assignments": assignments - remote_assignments,
            "remote_assignments": remote_assignments,
            "remote_fraction": remote_assignments / assignments if assignments else 0.0,
            "token_transfers": transfers,
            "traffic_matrix_tokens": traffic.tolist(),
            "bytes_per_token": token_bytes,
            "dispatch_bytes": transfers * token_bytes,
            "combine_bytes": transfers * token_bytes,
            "total_bytes": 2 * transfers * token_bytes,
            "dispatch_send_bytes": (sent * token_bytes).tolist(),
            "dispatch_recv_bytes": (received * token_bytes).tolist(),
            "combine_send_bytes": (received * token_bytes).tolist(),
            "combine_recv_bytes": (sent * token_bytes).tolist(),
            "max_device_send_bytes": int((sent + received).max()) * token_bytes,
        }

    @staticmethod
    def _placement(
        placement: Sequence[int] | PlacementPlan | None, num_experts: int, num_devices: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(primary device [E] int64, replica mask [E, D] bool or None)."""
        if placement is None:
            return torch.tensor(contiguous_placement(num_experts, num_devices)), None
        if isinstance(placement, PlacementPlan):
            if placement.num_devices != num_devices or len(placement.replicas) != num_experts:
                raise ValidationError(
                    f"placement: plan is for {len(placement.replicas)} experts on "
                    f"{placement.num_devices} devices, routing needs {num_experts} on "
                    f"{num_devices}"
                )
            mask = torch.zeros(num_experts, num_devices, dtype=torch.bool)
            for e, devices in enumerate(placement.replicas):
                mask[e, list(devices)] = True
            return torch.tensor(placement.device_of_expert, dtype=torch.int64), mask
        primary = torch.as_tensor(list(placement), dtype=torch.int64)
        if primary.shape != (num_experts,) or bool((primary < 0).any()) \
                or bool((primary >= num_devices).any()):
            raise ValidationError(
                f"placement: must list a device in [0, {num_devices}) for each of the "
                f"{num_experts} experts, got {list(placement)}"
            )
        return primary, None
