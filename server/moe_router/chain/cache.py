"""Response cache stage: identical calls to a deterministic router are answered from memory.

Never stale: the key holds everything that changes the answer (router, layer, router
version, options, and the dtype, shape and a 128-bit hash of every input tensor), routers
whose version moves with traffic are never cached, and stochastic routers are cached
only for calls that carry a seed. Bounded by entries and bytes (LRU) and by age (TTL).

Cached answers are shared between callers: treat a returned ``RouterOutput`` as read-only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from moe_router.chain.backend import Backend, RouteCall, RouteResult
from moe_router.errors import RouterConfigurationError
from moe_router.routing.output import TENSOR_FIELDS, RouterOutput

try:
    import xxhash

    def _digest(data: memoryview) -> bytes:
        return xxhash.xxh3_128_digest(data)

except ImportError:  # pragma: no cover - xxhash is a server dependency
    import hashlib

    def _digest(data: memoryview) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()


__all__ = [
    "CacheBackend",
    "CacheFigures",
    "cache_key",
    "tensor_digest",
    "output_nbytes",
    "process_rss_bytes",
]

log = logging.getLogger(__name__)

#: Adaptive sizing looks at this many lookups at a time.
ADAPT_WINDOW = 100
#: A window with at least this hit rate (and entry-bound evictions) grows the cache.
GROW_HIT_RATE = 0.5
#: The entry bound never grows past this multiple of the configured ``cache_size``.
MAX_GROWTH = 4


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """128-bit hash of a tensor's raw bytes (xxh3-128; blake2b-128 without xxhash)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return _digest(flat.numpy().data)


def _fingerprint(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return (str(tensor.dtype), tuple(tensor.shape), tensor_digest(tensor))


def cache_key(call: RouteCall, router_version: str) -> tuple[Any, ...]:
    """Everything that decides the answer to ``call``; equal keys mean equal answers.

    Shape and dtype sit beside the byte hash, so a [6, 4] and a [4, 6] tensor with the
    same bytes (or float32 vs int32 bit patterns) never share an entry.
    """
    options = call.options
    extras = tuple(
        (name, _fingerprint(tensor)) for name, tensor in sorted(options.extra_inputs.items())
    )
    input_ids = None if options.input_ids is None else _fingerprint(options.input_ids)
    return (
        call.router,
        call.layer,
        router_version,
        _fingerprint(call.hidden_states),
        options.return_router_logits,
        options.return_losses,
        options.seed,
        extras,
        input_ids,
    )


#: Payloads of at least this many bytes are hashed in a worker thread, so a large call
#: does not stall every other call on the event loop. Measured here: xxh3-128 takes
#: 0.15 ms for 4 MiB and 4 ms for 64 MiB; below 16 MiB the thread hop is not worth it.
_HASH_OFF_LOOP_BYTES = 16 * 2**20


def _payload_bytes(call: RouteCall) -> int:
    tensors = [call.hidden_states, *call.options.extra_inputs.values()]
    if call.options.input_ids is not None:
        tensors.append(call.options.input_ids)
    return sum(t.numel() * t.element_size() for t in tensors)


def output_nbytes(output: RouterOutput) -> int:
    """Bytes held by the tensors of a RouterOutput (what a cache entry costs)."""
    total = 0
    for name in TENSOR_FIELDS:
        value = getattr(output, name)
        if value is not None:
            total += value.numel() * value.element_size()
    return total


def process_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclasses.dataclass(frozen=True)
class CacheFigures:
    """The cache now: entries and bytes against their bounds, and its cumulative counts.

    hit_count counts single-flight joiners too (``coalesced_count`` of them);
    bypass_count: calls that could not or asked not to use the cache.
    """

    size: int
    max_size: int
    hit_count: int
    miss_count: int
    hit_rate: float
    ttl_seconds: float
    bytes: int
    max_bytes: int
    evictions: int
    expirations: int
    bypass_count: int
    coalesced_count: int


@dataclasses.dataclass
class _Entry:
    result: RouteResult
    nbytes: int
    expires_at: float


class CacheBackend:
    """A Backend that answers repeated identical calls from an LRU + TTL cache.

    router_version: the version string of the router, or ``layer -> version`` (must be
        cheap: it is called on every call; compute it when weights load). A LookupError
        from it (unknown layer) sends the call through uncached, so the stage that owns
        the layers raises the NotFoundError.
    stateful: the router's answer moves with traffic; every call passes through.
    stochastic: the router draws random numbers (bool or ``call -> bool``); such calls
        are cached only when they carry ``options.seed``.
    skip_cache calls neither read nor fill the cache (a fresh answer, no eviction of
        entries other callers use); they count as ``bypass_count``, not as misses.

    A hit returns the stored RouteResult with ``cache_hit=True`` and queue time, compute
    time, batch_requests and batch_tokens all 0 (no device call was made). Concurrent
    identical misses compute once (single flight): the first caller's call reaches the
    inner backend, the others wait for it and count as hits; an error reaches every
    waiter and is never cached.

    Adaptive sizing (``adaptive=True``), judged every ``ADAPT_WINDOW`` lookups:
      * grow: the window's hit rate >= ``GROW_HIT_RATE``, the entry bound evicted at
        least once and the byte bound did not -> ``max_size`` doubles, capped at
        ``MAX_GROWTH * cache_size``;
      * shrink: the process RSS exceeds ``rss_limit_bytes`` (when set) -> ``max_size``
        halves; and whenever an insert evicts to honour ``max_bytes``, ``max_size``
        drops to the entries that fit. Never below ``max(1, cache_size // 4)``.
    Without ``adaptive`` the entry bound stays ``cache_size``. ``clear()`` drops entries
    but keeps the cumulative counters (they feed Prometheus counters).
    """

    def __init__(
        self,
        inner: Backend,
        *,
        router_version: Callable[[int], str] | str,
        stateful: bool,
        stochastic: Callable[[RouteCall], bool] | bool = False,
        cache_size: int = 1000,
        max_bytes: int = 256 * 2**20,
        ttl_seconds: float = 300.0,
        adaptive: bool = True,
        rss_limit_bytes: int | None = None,
        rss_bytes: Callable[[], int] = process_rss_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_positive_int(cache_size, "cache_size")
        _check_positive_int(max_bytes, "max_bytes")
        if not ttl_seconds > 0:
            raise RouterConfigurationError(f"ttl_seconds: must be > 0, got {ttl_seconds!r}")
        if rss_limit_bytes is not None:
            _check_positive_int(rss_limit_bytes, "rss_limit_bytes")
        self._inner = inner
        self._version = router_version
        self._stateful = stateful
        self._stochastic = stochastic
        self._cache_size = cache_size
        self._min_size = max(1, cache_size // 4)
        self._max_size = cache_size
        self._max_bytes = max_bytes
        self._ttl = float(ttl_seconds)
        self._adaptive = adaptive
        self._rss_limit = rss_limit_bytes
        self._rss_bytes = rss_bytes
        self._clock = clock
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._inflight: dict[tuple[Any, ...], asyncio.Future[RouteResult]] = {}
        self._bytes = 0
        self._hits = self._misses = self._bypass = self._coalesced = 0
        self._evictions = self._expirations = 0
        self._window_lookups = self._window_hits = 0
        self._window_count_evictions = self._window_byte_evictions = 0

    # ------------------------------------------------------------------ Backend
    async def route(self, call: RouteCall) -> RouteResult:
        """Answer from the cache, join an identical call in flight, or compute and store."""
        if not self._cacheable(call):
            self._bypass += 1
            return await self._inner.route(call)
        try:
            version = self._version if isinstance(self._version, str) else self._version(call.layer)
        except LookupError:
            # An unknown layer: the stage that owns the layers answers it (NOT_FOUND).
            self._bypass += 1
            return await self._inner.route(call)
        if _payload_bytes(call) >= _HASH_OFF_LOOP_BYTES:  # keep long hashes off the loop
            key = await asyncio.to_thread(cache_key, call, version)
        else:
            key = cache_key(call, version)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires_at > self._clock():
                self._entries.move_to_end(key)
                self._count_lookup(hit=True)
                return _as_hit(entry.result)
            self._remove(key)
            self._expirations += 1
        pending = self._inflight.get(key)
        if pending is not None:
            self._count_lookup(hit=True)
            self._coalesced += 1
            return _as_hit(await asyncio.shield(pending))
        self._count_lookup(hit=False)
        task = asyncio.ensure_future(self._fill(key, call))
        task.add_done_callback(_consume_exception)
        self._inflight[key] = task
        return await asyncio.shield(task)

    def stats(self) -> CacheFigures:
        """Entries, bounds, hit/miss counts and rate, TTL, bytes, evictions and more."""
        lookups = self._hits + self._misses
        return CacheFigures(
            size=len(self._entries),
            max_size=self._max_size,
            hit_count=self._hits,
            miss_count=self._misses,
            hit_rate=self._hits / lookups if lookups else 0.0,
            ttl_seconds=self._ttl,
            bytes=self._bytes,
            max_bytes=self._max_bytes,
            evictions=self._evictions,
            expirations=self._expirations,
            bypass_count=self._bypass,
            coalesced_count=self._coalesced,
        )

    # ------------------------------------------------------------------ cache

    def clear(self) -> None:
        """Drop every entry (counters stay: they are cumulative)."""
        self._entries.clear()
        self._bytes = 0

    # ------------------------------------------------------------------ internals
    def _cacheable(self, call: RouteCall) -> bool:
        if self._stateful or call.options.skip_cache:
            return False
        stochastic = self._stochastic(call) if callable(self._stochastic) else self._stochastic
        return not stochastic or call.options.seed is not None

    async def _fill(self, key: tuple[Any, ...], call: RouteCall) -> RouteResult:
        try:
            result = await self._inner.route(call)
            self._store(key, result)
            return result
        finally:
            self._inflight.pop(key, None)

    def _store(self, key: tuple[Any, ...], result: RouteResult) -> None:
        nbytes = output_nbytes(result.output)
        if nbytes > self._max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(result, nbytes, self._clock() + self._ttl)
        self._bytes += nbytes
        byte_evicted = False
        while self._bytes > self._max_bytes:
            self._evict_oldest()
            byte_evicted = True
        if byte_evicted:
            self._window_byte_evictions += 1
            if self._adaptive:
                self._max_size = max(self._min_size, len(self._entries))
        while len(self._entries) > self._max_size:
            self._evict_oldest()
            self._window_count_evictions += 1

    def _remove(self, key: tuple[Any, ...]) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def _evict_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._bytes -= entry.nbytes
        self._evictions += 1

    def _count_lookup(self, *, hit: bool) -> None:
        if hit:
            self._hits += 1
            self._window_hits += 1
        else:
            self._misses += 1
        self._window_lookups += 1
        if self._window_lookups >= ADAPT_WINDOW:
            self._adapt()

    def _adapt(self) -> None:
        """Resize the entry bound from the last window (rule in the class docstring)."""
        hit_rate = self._window_hits / self._window_lookups
        old = self._max_size
        if self._adaptive:
            if self._rss_limit is not None and self._rss_bytes() > self._rss_limit:
                self._max_size = max(self._min_size, self._max_size // 2)
                while len(self._entries) > self._max_size:
                    self._evict_oldest()
            elif (
                hit_rate >= GROW_HIT_RATE
                and self._window_count_evictions > 0
                and self._window_byte_evictions == 0
            ):
                self._max_size = min(MAX_GROWTH * self._cache_size, self._max_size * 2)
        if self._max_size != old:
            log.info("response cache max_size %d -> %d (window hit rate %.2f)",
                     old, self._max_size, hit_rate)
        self._window_lookups = self._window_hits = 0
        self._window_count_evictions = self._window_byte_evictions = 0


def _as_hit(result: RouteResult) -> RouteResult:
    return dataclasses.replace(
        result, cache_hit=True, queue_time_us=0, compute_time_us=0,
        batch_requests=0, batch_tokens=0,
    )


def _consume_exception(task: asyncio.Future[RouteResult]) -> None:
    """Mark a fill's error as seen when every caller left before it finished."""
    if not task.cancelled():
        task.exception()


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouterConfigurationError(f"{name}: must be a positive integer, got {value!r}")
