"""The targets of issue 10 ("Route at close to the cost of routing in-process"), checked
against one bench run's ratios.

Each :class:`Target` is a bound on one figure of :data:`moe_router.analysis.bench_figures.RATIOS`
(or one in-process metric) over a slice of the sweep; :func:`evaluate_targets` gives one
:class:`TargetOutcome` per case the run measured (router, dtype, tokens, callers), or
one "not measured" outcome naming why (a door not built, no CUDA device, a token count
outside the plan). They are ratios measured side by side, never timed tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from moe_router.analysis.bench_figures import CellKey, Figures, Ratio

__all__ = ["Target", "TargetOutcome", "TARGETS", "evaluate_targets"]

_NO_LIMIT = 1 << 40


@dataclass(frozen=True)
class Target:
    """A bound on ``source`` over a slice of the sweep.

    source: a ratio name, or ``benchmark.metric`` of a raw cell (``ours.p50_ms``).
    tokens: inclusive range of tokens per call. concurrency: callers (None: in-process).
    needs: what must exist to measure it: ``grpc``, ``colocated``, ``cuda`` or ``cuda_ipc``.
    """

    name: str
    claim: str
    source: str
    bound: float
    at_most: bool
    tokens: tuple[int, int]
    concurrency: int | None
    needs: str = "grpc"
    dtype: str | None = None
    router: str | None = None
    unit: str = "x"

    def admits(self, key: CellKey, device: str) -> bool:
        """Whether the cell ``key`` (run on ``device``) is one of this target's cases."""
        return (key.tokens is not None and self.tokens[0] <= key.tokens <= self.tokens[1]
                and key.concurrency == self.concurrency
                and self.dtype in (None, key.dtype) and self.router in (None, key.router)
                and (self.needs not in ("cuda", "cuda_ipc") or device.startswith("cuda")))

    def holds(self, value: float) -> bool:
        """Whether ``value`` meets the bound."""
        return value <= self.bound if self.at_most else value >= self.bound

    def bound_text(self) -> str:
        """``<= 1.3x``, ``>= 3x``, ``<= 100 µs``."""
        unit = "x" if self.unit == "x" else f" {self.unit}"
        return f"{'<=' if self.at_most else '>='} {self.bound:g}{unit}"


TARGETS: tuple[Target, ...] = (
    Target("grpc-1-token", "gRPC, 1 token, 1 caller: p50 / echo p50", "grpc_over_echo_p50",
           1.3, True, (1, 1), 1),
    Target("grpc-scaling", "gRPC, 1-16 tokens, 16 callers: req/s / 1-caller req/s",
           "grpc_scaling", 3.0, False, (1, 16), 16),
    Target("grpc-vs-echo-16", "gRPC, 1-16 tokens, 16 callers: req/s / echo req/s",
           "grpc_over_echo_rps", 0.8, False, (1, 16), 16),
    Target("grpc-256", "gRPC, 256 tokens, 1 caller: p50 / (echo + matmul) p50",
           "grpc_over_floor_p50", 1.2, True, (256, 256), 1),
    Target("shm-1-token", "shared memory, 1 token: p50 above our router in-process",
           "colocated_extra_us", 100.0, True, (1, 1), 1, needs="colocated", unit="µs"),
    Target("shm-2048", "shared memory, 2048 tokens bf16: p50 / our router in-process",
           "colocated_over_ours_p50", 1.5, True, (2048, 2048), 1, needs="colocated",
           dtype="bfloat16"),
    Target("ours-1-token", "our router in-process, 1 token: p50 / plain PyTorch p50",
           "ours_over_plain_p50", 1.2, True, (1, 1), None),
    Target("ours-256-up", "our router in-process, >= 256 tokens: p50 / plain PyTorch p50",
           "ours_over_plain_p50", 1.05, True, (256, _NO_LIMIT), None),
    Target("gpu-8192", "GPU, DeepSeek-V3 shape, 8192 tokens: our router p50",
           "ours.p50_ms", 1.0, True, (8192, 8192), None, needs="cuda", router="deepseek-v3",
           unit="ms"),
    Target("cuda-ipc", "CUDA IPC door, 1 caller: p50 / our router in-process",
           "cuda_ipc_over_ours_p50", 1.2, True, (1, _NO_LIMIT), 1, needs="cuda_ipc"),
)


@dataclass(frozen=True)
class TargetOutcome:
    """One case of a target: its measured figure and whether it holds, or why it was not
    measured (``measured`` None, ``reason`` set)."""

    target: Target
    case: str
    measured: float | None
    reason: str = ""

    @property
    def passed(self) -> bool | None:
        """True / False when measured, None when not."""
        return None if self.measured is None else self.target.holds(self.measured)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        t = self.target
        return {"target": t.name, "claim": t.claim, "case": self.case, "measured": self.measured,
                "bound": t.bound, "at_most": t.at_most, "unit": t.unit, "passed": self.passed,
                "reason": self.reason}


def _case(key: CellKey) -> str:
    return replace(key, benchmark="").label().strip()


def evaluate_targets(ratios: Sequence[Ratio], figures: Figures, device: str,
                     skipped: Mapping[str, str], targets: Sequence[Target] = TARGETS
                     ) -> list[TargetOutcome]:
    """Each target's cases in this run. ``device``: where the in-process peers ran
    (``cpu``, ``cuda:0``); ``skipped``: a one-line reason per column left out (``colocated``,
    ``cuda_ipc``), shown where a target needs it."""
    outcomes: list[TargetOutcome] = []
    for target in targets:
        if "." in target.source:
            benchmark, metric = target.source.split(".", 1)
            cases = [(k, figures.metric(k, metric)) for k in figures.keys(benchmark)]
        else:
            cases = [(r.key, r.value) for r in ratios if r.key.benchmark == target.source]
        found = [TargetOutcome(target, _case(k), v) for k, v in cases
                 if v is not None and target.admits(k, device)]
        if found:
            outcomes += found
            continue
        if target.needs in ("cuda", "cuda_ipc") and not device.startswith("cuda"):
            reason = "no CUDA device on this host"
        elif target.needs in skipped:
            reason = skipped[target.needs]
        else:
            reason = "no such cell in this run (the plan's tokens, callers or dtypes)"
        outcomes.append(TargetOutcome(target, "", None, reason))
    return outcomes
