"""DeviceExecutor: the last stage of a router's chain, its forward passes.

A pass goes to the device pool's worker threads, except one measured to be cheap: when
no pass of this router is in the pool and passes of its size (a running mean per
power-of-two token count; CPU time on a CPU, wall time on a GPU) have taken at most
``inline_max_us``, it runs on the event loop itself (an inline pass is judged by its wall
time too, and one far over the budget keeps the router off the loop for a while:
:data:`INLINE_HOLD_S`). The hop to a worker and back costs
more than routing a token or a few (measured here: a 1-token Mixtral pass took 0.1 ms,
the hop 0.15 ms and the GIL handover under load several times that), and the budget
bounds how long the loop is held.

A call is checked once, on admission (:meth:`DeviceExecutor.admit`: layer, dtype, rank,
dim, estimator inputs, token ids), and carries the result of that check
(:class:`AdmittedCall`) to its pass, so nothing is looked up or validated twice. Inputs
move to the router's device, are routed under ``torch.inference_mode()``, and the answer
comes back to the host. Failures are sorted into the error tree here, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moe_router.chain.backend import AT_ONCE, RouteCall, RouteResult
from moe_router.errors import (
    BackendError,
    DeadlineExceededError,
    DynamicMoEError,
    NotFoundError,
    RouterMemoryError,
    ValidationError,
)
from moe_router.routing.base import RouterBase
from moe_router.routing.hashed import HashRouter
from moe_router.routing.output import LOGIT_BOUND, RouterOutput
from moe_router_client.frozen_init import fast_init

__all__ = ["AdmittedCall", "DeviceExecutor", "DeviceFigures", "PassAnswer"]

#: One call's answer from a device pass: its result, or the error that refused it alone.
PassAnswer = RouteResult | DynamicMoEError


@fast_init
@dataclass(frozen=True)
class AdmittedCall:
    """A call that passed the structural checks, with what they found.

    flat: the hidden states as [T, D] (a view); lead: the leading dims to answer with.
    batchable: whether it may share a device pass with other calls of its layer.
    admitted: ``time.perf_counter()`` at admission (its queue time starts here).
    """

    call: RouteCall
    router: RouterBase
    flat: torch.Tensor
    lead: tuple[int, ...]
    batchable: bool
    admitted: float = field(default_factory=time.perf_counter)

    @functools.cached_property
    def num_tokens(self) -> int:
        """Tokens in this call (read once: the batcher and the pass ask several times)."""
        return int(self.flat.shape[0])

    @property
    def batch_key(self) -> tuple[int, int, torch.dtype]:
        """Calls with equal keys may share a pass: same layer, hidden dim and dtype."""
        return (self.call.layer, int(self.flat.shape[1]), self.flat.dtype)


@dataclass(frozen=True)
class DeviceFigures:
    """The device stage's figures: where it runs, how many passes it made and how many
    of those ran on the event loop (``inline_passes``, see the module docstring)."""

    device: str
    layers: int
    passes: int
    calls: int
    inline_passes: int = 0


LOSS_SAMPLE_INTERVAL_S = 1.0
"""At most one computed call a second per router is routed with its losses, for the
``moe_router_aux_loss`` / ``moe_router_z_loss`` gauges (``on_losses``); serving callers do
not ask for losses, which cost about a third of a small call."""

INLINE_OVERRUN_FACTOR = 4
INLINE_OVERRUNS_TO_HOLD = 2
INLINE_HOLD_S = 10.0
"""``INLINE_OVERRUNS_TO_HOLD`` inline passes in a row whose wall time passes
``INLINE_OVERRUN_FACTOR`` times the budget (a router that waits instead of computing, a
stalled machine) keep the router's passes off the loop for ``INLINE_HOLD_S``. One alone
does not: a pass preempted for a few milliseconds on a busy host is not a slow router
(seen here under a profiler's load: one preempted pass held a 20 us router off the loop
for 10 s, where its calls cost about twice as much). The loop is held that long at most
twice per hold."""

_NEVER = float("inf")


def _size_class(tokens: int) -> int:
    """The power-of-two token count a pass's cost is averaged under."""
    return 1 << max(tokens - 1, 0).bit_length()


class DeviceExecutor:
    """Runs one hosted router's layers on its device, in ``pool`` threads.

    ``layers[i]`` routes MoE layer ``i``; ``versions[i]`` names its weights. As a
    Backend it routes each call in a pass of its own (batching off); the batcher drives
    it through :meth:`admit` and :meth:`run_pass` instead. ``merge_calls=False`` keeps
    every call in a pass of its own even under the batcher: on a CPU with more than one
    torch intra-op thread a merged pass is not bit-identical to routing alone (the BLAS
    splits one block's matmul between threads but gives several blocks a thread each).
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[RouterBase],
        versions: Sequence[str],
        device: torch.device,
        pool: Executor,
        *,
        merge_calls: bool = True,
        inline_max_us: int = 0,
        on_losses: Callable[[float, float], None] | None = None,
        loss_sample_interval_s: float = LOSS_SAMPLE_INTERVAL_S,
    ) -> None:
        self.name = name
        self.layers = tuple(layers)
        self.versions = tuple(versions)
        self.device = device
        self._on_host = device.type == "cpu"
        self.pool = pool
        first = self.layers[0]
        # Every layer of a router has the same class and config: judge once, at load.
        self._may_batch = merge_calls and not (
            first.couples_tokens_now or first.stateful or first.stochastic
        )
        self._needs_inputs = bool(first.required_estimator_inputs)
        self._count_lock = threading.Lock()
        self._passes = 0
        self._calls = 0
        self._inline_passes = 0
        self._inline_max_s = inline_max_us / 1e6
        self._in_pool = 0  # passes of this router handed to the pool and not back yet
        self._pass_cost: dict[int, float] = {}  # token size class -> running mean seconds
        self._inline_held_until = 0.0  # no pass on the loop before this monotonic time
        self._inline_overruns = 0  # inline passes in a row over the overrun bound
        self._on_losses = on_losses
        self._loss_interval = loss_sample_interval_s
        self._next_loss_sample = 0.0

    # ------------------------------------------------------------------ admission
    def admit(self, call: RouteCall) -> AdmittedCall:
        """Check ``call``'s layer, dtype, rank, dim and inputs; the only structural check.

        Cheap enough for the event loop; the values (finite, deadline) are checked in
        the worker thread right before the pass (:meth:`_refusal`).
        """
        layer = call.layer
        if not 0 <= layer < len(self.layers):
            raise NotFoundError(
                f"router '{self.name}' has no layer {layer}; "
                f"expected 0..{len(self.layers) - 1}"
            )
        router = self.layers[layer]
        flat, lead = router.validate(call.hidden_states, name=self.name)
        extra = call.options.extra_inputs
        if extra or self._needs_inputs:
            router.check_estimator_inputs(
                lead, {name: tuple(t.shape) for name, t in extra.items()}, f"router '{self.name}'"
            )
        input_ids = call.options.input_ids
        if isinstance(router, HashRouter):
            router.check_input_ids(input_ids, lead, f"router '{self.name}'")
        elif input_ids is not None:
            raise ValidationError(
                f"input_ids: router '{self.name}' does not route by token id; send "
                "input_ids only to hash routers"
            )
        # Calls with token ids run alone: hash routers are the few first layers of a model.
        batchable = self._may_batch and not extra and input_ids is None
        return AdmittedCall(call, router, flat, lead, batchable)

    # ------------------------------------------------------------------ device passes
    async def run_pass(self, admitted: Sequence[AdmittedCall]) -> list[PassAnswer]:
        """Route ``admitted`` (same layer) in one device pass in the pool.

        A call refused on its own (deadline passed, non-finite input) gets its error in
        its slot and the others still run; a device failure raises for them all.
        """
        tokens = sum(a.num_tokens for a in admitted)
        if self.runs_inline(tokens):
            self._inline_passes += 1
            return self._pass(admitted, tokens, inline=True)
        loop = asyncio.get_running_loop()
        self._in_pool += 1
        try:
            return await loop.run_in_executor(self.pool, self._pass, admitted, tokens)
        finally:
            self._in_pool -= 1

    def runs_inline(self, tokens: int) -> bool:
        """Whether a pass of ``tokens`` tokens runs on the event loop now: none of this
        router's passes is in the pool and passes of that size cost at most the budget."""
        return (self._in_pool == 0
                and self._pass_cost.get(_size_class(tokens), _NEVER) <= self._inline_max_s
                and time.monotonic() >= self._inline_held_until)

    def pass_cost_s(self, tokens: int) -> float:
        """The running mean cost (s) of a pass of ``tokens`` tokens; 0 if none ran yet."""
        return self._pass_cost.get(_size_class(tokens), 0.0)

    def inline_size(self, tokens: int) -> bool:
        """Whether passes of ``tokens`` tokens are not known to cost more than the inline
        budget (a size never measured may: its first pass measures it)."""
        return self.pass_cost_s(tokens) <= self._inline_max_s

    def _pass(
        self, admitted: Sequence[AdmittedCall], tokens: int, inline: bool = False
    ) -> list[PassAnswer]:
        """One blocking device pass of ``tokens`` tokens in all (a worker thread, or the
        loop when cheap: ``inline``)."""
        now = time.monotonic()
        answers: list[PassAnswer | None] = [self._refusal(a, now) for a in admitted]
        todo = [a for a, answer in zip(admitted, answers, strict=True) if answer is None]
        sampled = None
        if todo and self._on_losses is not None and now >= self._next_loss_sample:
            self._next_loss_sample = now + self._loss_interval
            sampled = todo[0]
        # An inline pass is judged by its wall time (below), so it reads no CPU clock: a
        # thread's CPU time is a system call under a hypervisor (0.4 us each in a loop).
        started, cpu_started = time.perf_counter(), 0.0 if inline else time.thread_time()
        outputs: list[RouterOutput | DynamicMoEError] = list(
            self._forward(todo, sampled) if todo else [])
        finished = time.perf_counter()
        cpu = 0.0 if inline else time.thread_time() - cpu_started
        for i, (a, out) in enumerate(zip(todo, outputs, strict=True)):
            if _judged_by_logits(a) and not _logits_bounded(out):  # type: ignore[arg-type]
                outputs[i] = ValidationError(self._logits_problem(a))
        if sampled is not None and isinstance(outputs[0], RouterOutput):
            outputs[0] = self._report_losses(outputs[0], sampled)
        # A pass on the loop for one call is accounted after its answer has been sent.
        after = admitted[0].call.after_answer if inline and len(admitted) == 1 else AT_ONCE
        after.add(self._account, tokens, finished - started, cpu, inline, len(todo))
        results = iter(outputs)
        for i, (a, answer) in enumerate(zip(admitted, answers, strict=True)):
            if answer is not None:
                continue
            out = next(results)
            answers[i] = out if isinstance(out, DynamicMoEError) else RouteResult(
                output=out,
                router_version=self.versions[a.call.layer],
                batch_requests=len(admitted),
                batch_tokens=tokens,
                queue_time_us=max(0, int((started - a.admitted) * 1e6)),
                compute_time_us=int((finished - started) * 1e6),
            )
        return answers  # type: ignore[return-value]  # every slot is filled

    def _account(self, tokens: int, wall: float, cpu: float, inline: bool, calls: int) -> None:
        """Count a pass of ``calls`` calls and ``tokens`` tokens, and fold its cost into its
        size's running mean (which decides whether the next such pass runs inline)."""
        # On a CPU the pass's own CPU time: in a worker its wall time also counts the
        # waits for the GIL, which an inline pass does not have. On a GPU the wall time:
        # a synchronise that sleeps instead of spinning leaves the kernels' time out of
        # the CPU time, and the loop would wait for them all the same.
        spent = cpu if self._on_host else wall
        if inline:  # what the loop waited, waits included (a router that sleeps)
            spent = max(spent, wall)
            if wall <= INLINE_OVERRUN_FACTOR * self._inline_max_s:
                self._inline_overruns = 0
            else:
                self._inline_overruns += 1
                if self._inline_overruns >= INLINE_OVERRUNS_TO_HOLD:
                    self._inline_overruns = 0
                    self._inline_held_until = time.monotonic() + INLINE_HOLD_S
        size = _size_class(tokens)
        cost = self._pass_cost.get(size)
        self._pass_cost[size] = spent if cost is None else cost + 0.2 * (spent - cost)
        with self._count_lock:
            self._passes += 1
            self._calls += calls

    def _refusal(self, admitted: AdmittedCall, now: float) -> DynamicMoEError | None:
        """Why the call must not run (deadline passed, values it cannot route), or None.

        Values are judged through one fp32 sum of squares per input (as cheap as a sum,
        measured ~25x cheaper than ``isfinite(x).all()`` on [8192, 4096]): it is
        non-finite for any NaN or Inf, and also for finite values so large that the
        router's own sums overflow float32 (hidden states of 3e38 made the gate logits
        infinite and the estimators fail). What was wrong is counted only on that path.

        A batchable call to a router whose ``values_judged_by_logits`` (it works row by
        row and never fails on a non-finite row) is not read here: the pass checks its
        [T, E] gate logits instead (``_logits_bounded``: finite and below 1.8e19), which any NaN
        or Inf in the input makes non-finite. Reading the [T, D] input cost a fifth of
        the gate matmul (measured here: 1.6 ms against 7.8 ms at [2048, 4096]).
        """
        deadline = admitted.call.deadline
        if deadline is not None and now >= deadline:
            return DeadlineExceededError(
                f"deadline passed before router '{self.name}' could start the call"
            )
        if _judged_by_logits(admitted):
            return None
        problem = _value_problem("hidden_states", admitted.flat)
        for name, values in admitted.call.options.extra_inputs.items():
            if problem is not None:
                break
            problem = _value_problem(name, values) or admitted.router.estimator_value_problem(
                name, values
            )
        return None if problem is None else ValidationError(problem)

    def _logits_problem(self, admitted: AdmittedCall) -> str:
        """What made a batchable call's gate logits non-finite (its answer is refused)."""
        return _value_problem("hidden_states", admitted.flat) or (
            f"hidden_states made router '{self.name}' compute non-finite gate logits; "
            "expected values whose products with the gate weights fit in float32"
        )

    def _report_losses(self, output: RouterOutput, admitted: AdmittedCall) -> RouterOutput:
        """Hand a sampled call's losses to ``on_losses``; answer only what it asked for."""
        if output.aux_loss is not None and output.z_loss is not None and self._on_losses:
            self._on_losses(float(output.aux_loss), float(output.z_loss))
        if admitted.call.options.return_losses:
            return output
        return dataclasses.replace(output, aux_loss=None, z_loss=None)

    def _forward(
        self, admitted: Sequence[AdmittedCall], sampled: AdmittedCall | None = None
    ) -> list[RouterOutput]:
        """Route ``admitted``; ``sampled`` also computes its losses (for the gauges)."""
        router = admitted[0].router
        losses = [a.call.options.return_losses or a is sampled for a in admitted]
        try:
            with torch.inference_mode():
                if len(admitted) == 1:
                    outputs = [self._forward_one(admitted[0], losses[0])]
                else:
                    flats = [a.flat.to(self.device, non_blocking=True) for a in admitted]
                    outputs = router.route_many_validated(
                        flats, [a.lead for a in admitted], return_losses=losses
                    )
                return outputs if self._on_host else [o.to("cpu") for o in outputs]
        except DynamicMoEError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise RouterMemoryError(
                f"router '{self.name}' layer {admitted[0].call.layer} ran out of device "
                f"memory on {sum(a.num_tokens for a in admitted)} tokens"
            ) from exc
        except RuntimeError as exc:
            layer = admitted[0].call.layer
            if "out of memory" in str(exc):
                raise RouterMemoryError(
                    f"router '{self.name}' layer {layer} ran out of memory: {exc}"
                ) from exc
            raise BackendError(f"router '{self.name}' layer {layer} failed: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"router '{self.name}' rejected the input: {exc}") from exc

    def _forward_one(self, admitted: AdmittedCall, losses: bool) -> RouterOutput:
        options = admitted.call.options
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(options.seed)
        extra: dict[str, Any] = {
            key: value.to(self.device) for key, value in options.extra_inputs.items()
        }
        if options.input_ids is not None:
            extra["input_ids"] = options.input_ids.to(self.device)
        flat = admitted.flat
        if flat.device != self.device:  # a no-op .to() still costs an op
            flat = flat.to(self.device)
        return admitted.router.route_validated(
            flat, admitted.lead, generator=generator,
            return_losses=losses, **extra,
        )

    # ------------------------------------------------------------------ Backend
    async def route(self, call: RouteCall) -> RouteResult:
        """Admit and route one call in a pass of its own (the stage when batching is off)."""
        (answer,) = await self.run_pass([self.admit(call)])
        if isinstance(answer, DynamicMoEError):
            raise answer
        return answer

    @property
    def passes_in_pool(self) -> int:
        """This router's passes running (or waiting) in the device pool now."""
        return self._in_pool

    @property
    def merges_calls(self) -> bool:
        """Whether calls of this router may share a device pass."""
        return self._may_batch

    def stats(self) -> DeviceFigures:
        """Where this router runs and the passes made so far."""
        return DeviceFigures(str(self.device), len(self.layers), self._passes, self._calls,
                             self._inline_passes)


_MAX_REDUCE = np.maximum.reduce
_NORM_BOUND = LOGIT_BOUND  # about sqrt(float32 max): past it a sum of squares overflows


def _judged_by_logits(admitted: AdmittedCall) -> bool:
    """Whether the call's values are checked on its logits after the pass (see _refusal)."""
    return admitted.batchable and admitted.router.values_judged_by_logits


def _logits_bounded(output: RouterOutput) -> bool:
    """Whether every gate logit [..., E] of ``output`` is finite and below
    :data:`LOGIT_BOUND` in magnitude (so that its square, the z-loss, stays finite); NaN
    compares False. The router's own verdict when it checked on the way (the fused CPU
    ops: a 1-token call's two numpy calls here cost 10-13 us of a 140 us co-located
    round trip, measured, far more than their 2.4 us in a loop).

    Otherwise on the host through numpy: two numpy calls cost less than four torch
    dispatches, and the ufunc's own reduce less than ``ndarray.max`` (which goes through a
    Python wrapper)."""
    if output.logits_bounded is not None:
        return output.logits_bounded
    logits = output.router_logits
    if not logits.numel():
        return True
    if logits.device.type == "cpu":
        return bool(_MAX_REDUCE(np.abs(logits.detach().numpy()), axis=None) < LOGIT_BOUND)
    return bool(logits.abs().amax() < LOGIT_BOUND)


def _value_problem(name: str, values: torch.Tensor) -> str | None:
    """Why ``values`` cannot be routed (non-finite, or too large for float32 sums), or None."""
    if not values.numel() or not values.is_floating_point():
        return None
    flat = values.reshape(-1)
    if math.isfinite(torch.linalg.vector_norm(flat, dtype=torch.float32).item()):
        return None
    bad = int((~torch.isfinite(flat)).sum())
    if bad:
        return f"{name} contains {bad} non-finite values (NaN or Inf); expected finite numbers"
    largest = float(flat.abs().max())
    return (
        f"{name} values are too large to route in float32 (largest magnitude {largest:.3g}); "
        f"expected an L2 norm below {_NORM_BOUND:.2g}"
    )
