"""DeviceExecutor: the last stage of a router's chain — forward passes in worker threads.

Torch never runs on the event loop: every device call goes to a thread pool. Inputs
are moved to the router's device, routed under ``torch.inference_mode()``, and the
answer comes back to the host. Failures are sorted into the error tree here, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import torch

from moe_router.chain.backend import RouteCall, RouteResult
from moe_router.errors import (
    BackendError,
    DeadlineExceededError,
    DynamicMoEError,
    NotFoundError,
    RouterMemoryError,
    ValidationError,
)
from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput

__all__ = ["DeviceExecutor", "BatchOutcome"]


class BatchOutcome:
    """Answers of one device pass (an error in the slot of a call refused on its own)
    plus its timing (seconds on the perf_counter clock)."""

    __slots__ = ("outputs", "started", "finished")

    def __init__(
        self,
        outputs: Sequence[RouterOutput | DynamicMoEError | None],
        started: float,
        finished: float,
    ) -> None:
        self.outputs = outputs
        self.started = started
        self.finished = finished


class DeviceExecutor:
    """Runs one hosted router's layers on its device, in ``pool`` threads.

    ``layers[i]`` routes MoE layer ``i``; ``versions[i]`` names its weights.
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[RouterBase],
        versions: Sequence[str],
        device: torch.device,
        pool: Executor,
    ) -> None:
        self.name = name
        self.layers = tuple(layers)
        self.versions = tuple(versions)
        self.device = device
        self.pool = pool

    # ------------------------------------------------------------------ checks
    def router_for(self, layer: int) -> RouterBase:
        """The router module of ``layer`` or NotFoundError naming the valid range."""
        if not 0 <= layer < len(self.layers):
            raise NotFoundError(
                f"router '{self.name}' has no layer {layer}; "
                f"expected 0..{len(self.layers) - 1}"
            )
        return self.layers[layer]

    def check(self, call: RouteCall) -> RouterBase:
        """Check ``call``'s layer, dtype, rank, dim and inputs before it queues.

        Structure only, so it is cheap on the event loop; the values are checked in the
        worker thread (:meth:`refusal`). Returns the layer's router.
        """
        router = self.router_for(call.layer)
        hidden = call.hidden_states
        router.validate(hidden, name=self.name)
        if call.options.extra_inputs and not router.accepts_estimator_inputs:
            raise ValidationError(
                f"router '{self.name}' takes no estimator inputs "
                f"({', '.join(sorted(call.options.extra_inputs))}); only dynamic and "
                "adaptive routers use attention_weights, logits or gradients"
            )
        return router

    def batchable(self, call: RouteCall) -> bool:
        """Whether ``call`` may share a device pass with other calls."""
        router = self.router_for(call.layer)
        return not (
            router.couples_tokens_now
            or router.stateful
            or router.stochastic
            or call.options.extra_inputs
        )

    # ------------------------------------------------------------------ device work
    def refusal(self, call: RouteCall, now: float) -> DynamicMoEError | None:
        """Why ``call`` must not run (deadline passed, non-finite input), or None.

        Non-finite values are found through one fp32 sum (any NaN or Inf makes it
        non-finite; measured ~25x cheaper than ``isfinite(x).all()`` on [8192, 4096]),
        and counted only on that error path.
        """
        if call.deadline is not None and now >= call.deadline:
            return DeadlineExceededError(
                f"deadline passed before router '{self.name}' could start the call"
            )
        hidden = call.hidden_states
        if hidden.numel() and not torch.isfinite(hidden.sum(dtype=torch.float32)):
            bad = int((~torch.isfinite(hidden)).sum())
            if bad:
                return ValidationError(
                    f"hidden_states contains {bad} non-finite values (NaN or Inf); "
                    "expected finite numbers"
                )
        return None

    def run_batch(self, layer: int, calls: Sequence[RouteCall]) -> BatchOutcome:
        """Route ``calls`` (same layer) in one device pass; blocking, for worker threads.

        A call refused on its own (see :meth:`refusal`) gets its error in its slot of
        ``outputs`` and the others still run; a device failure fails them all.
        """
        router = self.router_for(layer)
        now = time.monotonic()
        answers: list[RouterOutput | DynamicMoEError | None] = [
            self.refusal(call, now) for call in calls
        ]
        todo = [i for i, answer in enumerate(answers) if answer is None]
        started = time.perf_counter()
        if todo:
            outputs = self._forward(router, layer, [calls[i] for i in todo])
            for i, output in zip(todo, outputs, strict=True):
                answers[i] = output
        return BatchOutcome(answers, started, time.perf_counter())

    def _forward(
        self, router: RouterBase, layer: int, calls: Sequence[RouteCall]
    ) -> list[RouterOutput]:
        try:
            with torch.inference_mode():
                if len(calls) == 1:
                    outputs = [self._forward_one(router, calls[0])]
                else:
                    hidden = [c.hidden_states.to(self.device, non_blocking=True) for c in calls]
                    outputs = router.route_many(hidden)
                return [o.to("cpu") if self.device.type != "cpu" else o for o in outputs]
        except DynamicMoEError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise RouterMemoryError(
                f"router '{self.name}' layer {layer} ran out of device memory "
                f"on {sum(c.num_tokens for c in calls)} tokens"
            ) from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc):
                raise RouterMemoryError(
                    f"router '{self.name}' layer {layer} ran out of memory: {exc}"
                ) from exc
            raise BackendError(f"router '{self.name}' layer {layer} failed: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"router '{self.name}' rejected the input: {exc}") from exc

    def _forward_one(self, router: RouterBase, call: RouteCall) -> RouterOutput:
        generator = None
        if call.options.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(call.options.seed)
        extra: dict[str, Any] = {
            key: value.to(self.device) for key, value in call.options.extra_inputs.items()
        }
        return router(call.hidden_states.to(self.device), generator=generator, **extra)

    # ------------------------------------------------------------------ Backend
    async def route(self, call: RouteCall) -> RouteResult:
        """Check and route one call alone (the Backend door used when batching is off)."""
        self.check(call)
        return await self.run_alone(call)

    async def run_alone(self, call: RouteCall) -> RouteResult:
        """Route one already-checked call in its own device pass."""
        enqueued = time.perf_counter()
        outcome = await asyncio.get_running_loop().run_in_executor(
            self.pool, self.run_batch, call.layer, [call]
        )
        answer = outcome.outputs[0]
        if not isinstance(answer, RouterOutput):
            raise answer if answer is not None else BackendError("no answer")
        return self.result(call, answer, outcome, enqueued, 1, call.num_tokens)

    def result(
        self,
        call: RouteCall,
        output: RouterOutput,
        outcome: BatchOutcome,
        enqueued: float,
        batch_requests: int,
        batch_tokens: int,
    ) -> RouteResult:
        """Wrap one answer of a device pass with its provenance and timings."""
        return RouteResult(
            output=output,
            router_version=self.versions[call.layer],
            batch_requests=batch_requests,
            batch_tokens=batch_tokens,
            queue_time_us=max(0, int((outcome.started - enqueued) * 1e6)),
            compute_time_us=int((outcome.finished - outcome.started) * 1e6),
        )

    def stats(self) -> dict[str, Any]:
        """Running routing statistics per layer, as the router modules keep them."""
        return {"layers": [router.get_stats() for router in self.layers]}
