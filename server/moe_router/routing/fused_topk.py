"""The top-k family's inference routing as compiled CPU ops (``fused_topk.cpp``), built on
first use.

Routing a few tokens is a handful of tiny tensor ops, each costing its dispatch more than
its arithmetic: eager PyTorch's softmax top-k is five calls (matmul, softmax, topk, sum,
div) and ours, which also answers int32 indices, per-token and per-expert counts and
keeps batch invariance, was thirteen; DeepSeek-V3's grouped selection is a dozen more.
One op that does it all per row costs one dispatch: ``topk_route`` (then
``topk_softmax_route``) measured here on one thread (AMD EPYC, 2 cores), against plain
PyTorch routing (``x @ W.T``, softmax, top-k, renormalise), p50:

    E = 8,   D = 4096:  1 token 3.7 against 7.4 us, 16 tokens 19 against 31,
                        256 tokens 301 against 396-410 (the matmul alone: 362)
    E = 128, D = 2048:  1 token 13 against 18

Its gate matmul is its own: each row's dot products keep 16 partial sums per expert,
added in a fixed order, so a token's logits do not depend on its batch mates nor on the
intra-op thread count (the rows are split between threads, never a dot product). The
answers equal PyTorch's to float32 rounding (indices exactly, save for near ties). Where
the op's matmul loses to the tuned one (:data:`FEW_TOKENS`), ``topk_select`` selects from
the batch-invariant matmul's logits instead.

:func:`kernel_available` is False when the ops cannot be had (no C++ compiler or ninja on
the host, a build error: logged once); the routers then use PyTorch ops. The build takes
about 20 s once per machine and is kept in ``torch.utils.cpp_extension``'s build cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that
carries a digest of the source, the flags and torch's version (:func:`library_name`);
later processes import it from there without running ninja.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moe_router.routing.output import LOGIT_BOUND

__all__ = ["STALE_LOCK_S", "FusedRoute", "FusedSelection", "SelectionSpec", "kernel_available",
           "library_name", "routes_call", "topk_route", "topk_select"]

log = logging.getLogger("moe_router")

_SOURCE = Path(__file__).with_name("fused_topk.cpp")
# Vector extensions to compile for, by what torch found on this CPU (never more than it has).
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma", "-mf16c"],
              "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw"]}


class FusedRoute(NamedTuple):
    """One call's answer from the op: T tokens, E experts, k = top_k."""

    indices: torch.Tensor  # [T, k] int32, largest weight first
    weights: torch.Tensor  # [T, k] float32
    num_per_token: torch.Tensor  # [T] int32, all k
    counts: torch.Tensor  # [E] int64
    logits: torch.Tensor  # [T, E] float32
    scores: torch.Tensor | None  # [T, E] float32, softmax or sigmoid; None unless asked for
    logits_bounded: bool  # every logit finite and below LOGIT_BOUND in magnitude


class FusedSelection(NamedTuple):
    """One call's selection from its logits: T tokens, E experts, k = top_k."""

    indices: torch.Tensor  # [T, k] int32, largest choice first
    weights: torch.Tensor  # [T, k] float32
    num_per_token: torch.Tensor  # [T] int32, all k
    counts: torch.Tensor  # [E] int64
    scores: torch.Tensor  # [T, E] float32, softmax or sigmoid of the logits
    logits_bounded: bool  # every logit read finite and below LOGIT_BOUND in magnitude


@dataclass(frozen=True)
class SelectionSpec:
    """How a router of the top-k family selects (what the ops take besides the tensors).

    ``sigmoid``: sigmoid scores, else softmax; ``bias_on_logits``: the correction bias is
    added to the logits, else to the scores; ``groups`` of which ``kept_groups`` stay, by
    their best choice or the sum of their best two (``top2_sum``), the others' experts at
    -inf or 0 (``fill_zero``); weights renormalised (w / (sum w + eps), w / sum w when
    ``eps`` is 0) when ``renormalize``, then times ``scale``. At most 64 groups.
    """

    sigmoid: bool = False
    bias_on_logits: bool = False
    groups: int = 1
    kept_groups: int = 1
    top2_sum: bool = False
    fill_zero: bool = False
    renormalize: bool = True
    eps: float = 0.0
    scale: float = 1.0

    @functools.cached_property
    def arguments(self) -> tuple[bool, bool, int, int, int, bool, bool, float, float]:
        """The ops' positional arguments after k, in their order (made once: a call is a
        few microseconds)."""
        return (self.sigmoid, self.bias_on_logits, self.groups, self.kept_groups,
                int(self.top2_sum), self.fill_zero, self.renormalize, self.eps, self.scale)


class _Kernel:
    """The op once built and loaded (or the reason it is not), for the whole process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self.ops: Any = None  # the extension module once loaded
        self.every_size = False  # its matmul serves every call size (see FEW_TOKENS)
        self.few_tokens = FEW_TOKENS  # else the calls it serves at most (see FEW_TOKENS)

    def get(self) -> Any:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self.ops = _build()
                    rows_at_once = 0 if self.ops is None else self.ops.rows_at_once
                    self.every_size = rows_at_once > 1 and self.ops.cpu_vendor == "amd"
                    self.few_tokens = FEW_TOKENS_SIX_ROWS if rows_at_once > 1 else FEW_TOKENS
                    self._tried = True
        return self.ops


def library_name() -> tuple[str, list[str]]:
    """The op's library name on this host and its compiler flags. The name carries a digest
    of the source, the flags and torch's version, so a library of that name in the build
    cache is this very build (and one of another CPU's vector extensions is never taken)."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", *_ISA_FLAGS.get(capability, [])]
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join([*flags, torch.__version__]).encode())
    return f"moe_router_fused_topk_{capability.lower()}_{digest.hexdigest()[:12]}", flags


def _build() -> Any:
    """Load the ops' module from the build cache, else compile it there first (ninja and
    a C++ compiler); None, logged, when that fails."""
    try:
        from torch.utils import cpp_extension

        name, flags = library_name()
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        lock = built.parent / "lock"  # cpp_extension's, held while it builds
        _remove_if_stale(lock)
        # Built and no build running: import it, with no ninja run in every process.
        if built.is_file() and not lock.exists():
            spec = importlib.util.spec_from_file_location(name, built)
            if spec is None or spec.loader is None:
                raise ImportError(f"{built} is not an extension module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        log.info("building the fused CPU top-k ops in %s (once per host and torch "
                 "version, about 20 s)", built.parent)
        return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                                  verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: PyTorch ops instead
        last_line = (str(exc).strip().splitlines() or [""])[-1]
        log.warning("fused CPU top-k ops unavailable (%s: %s); routing with PyTorch ops "
                    "(a C++ compiler and ninja build them)", type(exc).__name__, last_line)
        return None


STALE_LOCK_S = 600.0
"""A build lock older than this (a build takes about 20 s) was left by a build that was
killed; cpp_extension would wait for it forever, so it is removed."""


def _remove_if_stale(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, a build lock %.0f s old (its build never finished)",
                    lock, age)
        lock.unlink(missing_ok=True)


FEW_TOKENS = 8
FEW_TOKENS_SIX_ROWS = 16
FEW_EXPERTS = 16
"""When :func:`topk_route`'s own gate matmul serves a call. Built for AVX-512 it multiplies
rows six at a time; with four at a time and 256 KiB tiles it beat the batch-invariant
matmul plus ``topk_select`` at every size (measured on one thread, 2 shared cores of an
AMD EPYC with AVX-512, p50, op against that pair):

    E = 8,   D = 4096:  0.39x at 1 token, 0.19x at 256, 0.25x at 2048
    E = 64,  D = 2048:  0.46x at 1 token, 0.79x at 256, 0.80x at 2048
    E = 128, D = 2880:  0.64x at 1 token, 0.88x at 256, 0.87x at 2048
    E = 256, D = 7168:  0.76x at 1 token, 0.44x at 4, 0.81x at 256, 0.80x at 2048

On 2 shared cores of an Intel Xeon with a 2 MiB L2 (AVX-512, six rows, the whole routers
in-process, fused against unfused, fp32, one thread) the op lost on wide gates past a few
tokens: E = 256, D = 7168 0.85x at 1 token, 1.04x at 16, 1.19x at 32, 1.36x at 256 (8.8
against 6.4 ms), 1.42x at 1024; E = 64 and 128: 0.43-0.52x at 1, 0.86-0.91x at 16,
1.03-1.08x at 32, 1.23-1.42x from 256 on; E = 8, D = 4096 0.37-0.77x from 1 to 1024 tokens.
There PyTorch's matmul (MKL, which takes its fastest paths on Intel's CPUs) outruns the
op's. So the op serves every size only when built for AVX-512 on AMD's CPUs; elsewhere,
built for AVX-512, it takes calls of at most ``FEW_TOKENS_SIX_ROWS`` tokens and every
call of a router with at most ``FEW_EXPERTS`` experts. Measured again on that Xeon, the
op forced to every size against the PyTorch path: E = 256 0.94x at 8 tokens, 0.75x at
12, 0.98x at 16, 0.82x at 24, 1.22x at 32; E = 64 and 128 0.49-0.74x from 8 to 24,
0.82-0.91x at 32 (the batch-invariant matmul pads a call to the next power of two of
rows; the op does not). Up to 16 tokens the op at least matches it, and a merged pass
then stacks such calls into one op call (``TopKRouter.route_many_validated``): fifteen
16-token DeepSeek-V3 calls 10.8 -> 9.7 ms, eight of 12 tokens 5.6 -> 3.9 ms.

Built for AVX2 (sixteen registers: one row at a time) it loses past a few tokens once
the gate is wide (the same host with the AVX2 build: 1.12-1.36x at 64 tokens and more
for 64-256 experts, 0.30-0.40x for 8), so there it takes calls of at most
``FEW_TOKENS`` tokens, and every call of a router with at most ``FEW_EXPERTS`` experts.
A call's path depends on its own size and the host alone, so a merged pass answers each
call as routing it alone does."""


def routes_call(rows: int, weight: torch.Tensor) -> bool:
    """Whether :func:`topk_route` serves a call of ``rows`` tokens through gate ``weight``
    [E, D]: the op is built on this host and its matmul serves the size (see
    :data:`FEW_TOKENS`)."""
    return _KERNEL.get() is not None and (
        _KERNEL.every_size or rows <= _KERNEL.few_tokens or weight.shape[0] <= FEW_EXPERTS)


_KERNEL = _Kernel()


def kernel_available() -> bool:
    """Whether the op is built and loaded in this process (building it if not tried yet)."""
    return _KERNEL.get() is not None


def topk_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    spec: SelectionSpec,
    want_scores: bool = True,
    load: torch.Tensor | None = None,
) -> FusedRoute:
    """Route x [T, D] (fp32, bf16 or fp16, CPU) through gate ``weight`` [E, D] (fp32) and
    ``gate_bias`` [E] (fp32) when given: the gate logits by the op's own batch-invariant
    dot products, then :func:`topk_select`'s selection with the correction ``bias``; the
    scores themselves only with ``want_scores``. The counts are also added into ``load``
    (int64 [E], atomically) when given: the router's running expert load, one dispatch
    less per call than ``load.add_(counts)``. Only where :func:`kernel_available`."""
    tensors, bounded = _ops().topk_route(x, weight, gate_bias, bias, k, *spec.arguments,
                                         want_scores, LOGIT_BOUND, load)
    indices, weights, per_token, counts, logits, scores = tensors
    return FusedRoute(indices, weights, per_token, counts, logits, scores, bounded)


def topk_select(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, spec: SelectionSpec
) -> FusedSelection:
    """The top-k family's selection from gate logits [T, E] (fp32, contiguous, CPU), as
    :meth:`TopKRouter.select <moe_router.routing.topk.TopKRouter.select>` and
    :func:`scoring.mask_dropped_groups <moe_router.routing.scoring.mask_dropped_groups>`
    define it (``spec``), with the correction ``bias`` [E] when given: top-``k`` with
    ties to the lower index (and the lower group); and whether every logit was finite
    and below :data:`LOGIT_BOUND` in magnitude. Only where :func:`kernel_available`."""
    tensors, bounded = _ops().topk_select(logits, bias, k, *spec.arguments, LOGIT_BOUND)
    indices, weights, per_token, counts, scores = tensors
    return FusedSelection(indices, weights, per_token, counts, scores, bounded)


def _ops() -> Any:
    ops = _KERNEL.get()
    if ops is None:
        raise RuntimeError("the fused top-k ops are not available on this host")
    return ops
