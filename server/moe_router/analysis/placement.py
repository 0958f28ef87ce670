"""Expert placement across devices: greedy LPT with optional hot-expert replication (EPLB idea).

Given the load of each expert (tokens routed to it), place E experts on D devices so
the busiest device does as little as possible. Experts are taken largest load first
and each goes to the least-loaded device that still has a free slot (longest
processing time first, Graham 1969). With ``redundant_slots`` every device gets that
many extra slots, filled with replicas of the hottest experts; an expert's load is
split evenly across its replicas (as DeepSeek's EPLB does), replicas sit on distinct
devices. The placement loop runs over experts, never over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from moe_router.errors import ValidationError

__all__ = ["PlacementPlan", "plan_placement", "contiguous_placement", "imbalance"]


@dataclass(frozen=True)
class PlacementPlan:
    """Where each expert lives and what that does to per-device load.

    device_of_expert:   [E] primary device of each expert (the lowest-numbered device
                        holding a copy); pass it as ``placement`` to
                        ``RoutingSimulator.estimate_communication_cost``.
    replicas:           [E] devices holding a copy of each expert (distinct, ascending).
    experts_on_device:  [D] experts each device holds.
    device_load:        [D] load per device under this plan (replica loads split evenly).
    device_load_before: [D] load per device under contiguous placement (expert e on
                        device e * D // E), the usual starting point.
    imbalance_before / imbalance_after: max / mean device load (1.0 is perfect).
    max_load / mean_load: of ``device_load``.
    method: ``greedy`` (LPT, with replicas if asked) or ``contiguous`` when the greedy
        plan would not lower the maximum load (LPT is a heuristic; we never return a
        plan worse than the starting point).
    """

    num_devices: int
    slots_per_device: int
    device_of_expert: tuple[int, ...]
    replicas: tuple[tuple[int, ...], ...]
    experts_on_device: tuple[tuple[int, ...], ...]
    device_load: tuple[float, ...]
    device_load_before: tuple[float, ...]
    imbalance_before: float
    imbalance_after: float
    max_load: float
    mean_load: float
    method: Literal["greedy", "contiguous"]

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain lists and numbers (JSON-serialisable)."""
        return {k: _plain(v) for k, v in asdict(self).items()}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def contiguous_placement(num_experts: int, num_devices: int) -> list[int]:
    """Device of each expert when experts are split into D contiguous, balanced blocks.

    Expert e goes to device ``e * D // E`` (block sizes differ by at most one), the
    layout expert-parallel frameworks use by default.
    """
    return [e * num_devices // num_experts for e in range(num_experts)]


def imbalance(device_load: Sequence[float]) -> float:
    """max / mean of per-device load; 1.0 for perfectly even (or no) load."""
    total = float(sum(device_load))
    if total == 0.0:
        return 1.0
    return max(device_load) / (total / len(device_load))


def _as_loads(expert_load: object) -> list[float]:
    if isinstance(expert_load, torch.Tensor):
        expert_load = expert_load.detach().cpu().double().numpy()
    try:
        array = np.asarray(expert_load, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"expert_load: must be a sequence of numbers ({exc})") from exc
    if array.ndim != 1 or array.size == 0:
        raise ValidationError(
            f"expert_load: must be a non-empty 1-D sequence, got shape {list(array.shape)}"
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValidationError("expert_load: every load must be finite and >= 0")
    return array.tolist()


def _replica_counts(loads: list[float], num_devices: int, extra: int) -> list[int]:
    """Give ``extra`` replicas, one at a time, to the expert with the largest per-replica load."""
    counts = [1] * len(loads)
    for _ in range(extra):
        best, best_load = -1, 0.0
        for e, load in enumerate(loads):
            per_replica = load / counts[e]
            if counts[e] < num_devices and per_replica > best_load:
                best, best_load = e, per_replica
        if best < 0:  # nothing with load left to split
            break
        counts[best] += 1
    return counts


def _greedy(
    loads: list[float], counts: list[int], num_devices: int, slots: int
) -> tuple[list[list[int]], list[float]]:
    """LPT over replicas: largest first, to the least-loaded device with room and no copy."""
    items = sorted(
        ((loads[e] / counts[e], e) for e in range(len(loads)) for _ in range(counts[e])),
        key=lambda item: (-item[0], item[1]),
    )
    held: list[list[int]] = [[] for _ in range(num_devices)]
    load = [0.0] * num_devices
    share = {e: loads[e] / counts[e] for e in range(len(loads))}
    for item_load, e in items:
        candidates = [d for d in range(num_devices) if len(held[d]) < slots and e not in held[d]]
        if not candidates:
            # Every device with room already holds e: move some other expert y from a full
            # device without e onto a free device that lacks y (one always exists).
            free = next(d for d in range(num_devices) if len(held[d]) < slots)
            full = min((d for d in range(num_devices) if e not in held[d]),
                       key=lambda d: (load[d], d))
            y = next(y for y in held[full] if y not in held[free])
            held[full].remove(y)
            held[free].append(y)
            load[full] -= share[y]
            load[free] += share[y]
            candidates = [full]
        target = min(candidates, key=lambda d: (load[d], d))
        held[target].append(e)
        load[target] += item_load
    return held, load


def plan_placement(
    expert_load: Sequence[float] | torch.Tensor | np.ndarray,
    num_devices: int,
    redundant_slots: int = 0,
) -> PlacementPlan:
    """Place experts with loads ``expert_load`` [E] on ``num_devices`` devices.

    Each device has ``ceil(E / D) + redundant_slots`` slots; the ``redundant_slots * D``
    extra slots hold replicas of the hottest experts (at most one copy per device).
    Returns a :class:`PlacementPlan` with the load imbalance before (contiguous
    placement) and after.
    """
    loads = _as_loads(expert_load)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValidationError(f"num_devices: must be a positive integer, got {num_devices!r}")
    if isinstance(redundant_slots, bool) or not isinstance(redundant_slots, int) \
            or redundant_slots < 0:
        raise ValidationError(
            f"redundant_slots: must be an integer >= 0, got {redundant_slots!r}"
        )
    num_experts = len(loads)
    slots = math.ceil(num_experts / num_devices) + redundant_slots
    before = [0.0] * num_devices
    for e, d in enumerate(contiguous_placement(num_experts, num_devices)):
        before[d] += loads[e]

    counts = _replica_counts(loads, num_devices, redundant_slots * num_devices)
    held, after = _greedy(loads, counts, num_devices, slots)
    method: Literal["greedy", "contiguous"] = "greedy"
    if max(after) >= max(before):
        method = "contiguous"
        held = [[] for _ in range(num_devices)]
        for e, d in enumerate(contiguous_placement(num_experts, num_devices)):
            held[d].append(e)
        after = list(before)

    replicas: list[list[int]] = [[] for _ in range(num_experts)]
    for d, experts in enumerate(held):
        for e in experts:
            replicas[e].append(d)
    return PlacementPlan(
        num_devices=num_devices,
        slots_per_device=slots,
        device_of_expert=tuple(r[0] for r in replicas),
        replicas=tuple(tuple(r) for r in replicas),
        experts_on_device=tuple(tuple(sorted(h)) for h in held),
        device_load=tuple(after),
        device_load_before=tuple(before),
        imbalance_before=imbalance(before),
        imbalance_after=imbalance(after),
        max_load=max(after),
        mean_load=sum(after) / num_devices,
        method=method,
    )
