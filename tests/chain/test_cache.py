"""CacheBackend over a real TopKRouter: keys, bounds, TTL, adaptive size, single flight."""

from __future__ import annotations

import asyncio

import pytest
import torch
from chain_backends import HIDDEN, FakeClock, FaultyBackend, TopKBackend, make_call

from moe_router.chain.backend import RouteCall
from moe_router.chain.cache import (
    ADAPT_WINDOW,
    CacheBackend,
    cache_key,
    output_nbytes,
    tensor_digest,
)
from moe_router.errors import BackendError, NotFoundError, RouterConfigurationError


def _cache(inner=None, **kwargs) -> CacheBackend:
    inner = inner or TopKBackend()
    kwargs.setdefault("router_version", inner.version if hasattr(inner, "version") else "v1")
    kwargs.setdefault("stateful", False)
    return CacheBackend(inner, **kwargs)


def test_hit_returns_the_same_answer_without_calling_the_router() -> None:
    inner = TopKBackend()
    cache = _cache(inner)
    call = make_call()

    async def run():
        return await cache.route(call), await cache.route(call)

    miss, hit = asyncio.run(run())
    assert inner.calls == 1
    assert not miss.cache_hit and hit.cache_hit
    assert (hit.queue_time_us, hit.compute_time_us, hit.batch_requests) == (0, 0, 0)
    torch.testing.assert_close(hit.output.expert_indices, miss.output.expert_indices)
    torch.testing.assert_close(hit.output.expert_weights, miss.output.expert_weights)
    # and it is what the router says for this input
    fresh = inner.router(call.hidden_states)
    torch.testing.assert_close(hit.output.expert_weights, fresh.expert_weights)
    stats = cache.stats()
    assert stats.hit_count == 1 and stats.miss_count == 1
    assert stats.hit_rate == 0.5
    assert inner.calls == 1


def test_same_bytes_different_shape_or_dtype_never_collide() -> None:
    data = torch.arange(24, dtype=torch.float32)
    a = make_call(data.reshape(6, 4))
    b = make_call(data.reshape(4, 6))
    assert tensor_digest(a.hidden_states) == tensor_digest(b.hidden_states)
    assert cache_key(a, "v") != cache_key(b, "v")
    as_int = make_call(data.view(torch.int32).reshape(6, 4))
    assert cache_key(a, "v") != cache_key(as_int, "v")


def test_key_covers_every_option_that_changes_the_answer() -> None:
    base = make_call()
    hs = base.hidden_states
    attn = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    variants = [
        make_call(hs, router="other"),
        make_call(hs, layer=3),
        make_call(hs, return_router_logits=True),
        make_call(hs, seed=7),
        make_call(hs, extra_inputs={"attention_weights": attn}),
        make_call(hs, extra_inputs={"attention_weights": attn.reshape(1, 16)}),
        make_call(hs.to(torch.bfloat16)),
    ]
    keys = {cache_key(base, "v")} | {cache_key(c, "v") for c in variants}
    assert len(keys) == len(variants) + 1
    assert cache_key(base, "v1") != cache_key(base, "v2")
    # options that do not change the answer do not split the key
    assert cache_key(make_call(hs, peer="alice"), "v") == cache_key(make_call(hs, peer="bob"), "v")


def test_version_callable_is_asked_per_layer() -> None:
    inner = TopKBackend()
    versions = {0: "a", 1: "b"}
    cache = _cache(inner, router_version=lambda layer: versions[layer])

    async def run():
        await cache.route(make_call(layer=0))
        await cache.route(make_call(layer=1))
        versions[0] = "a2"  # new weights for layer 0: the old entry must not be served
        return await cache.route(make_call(layer=0))

    third = asyncio.run(run())
    assert not third.cache_hit and inner.calls == 3


def test_unknown_layer_goes_through_uncached_to_the_stage_that_knows_layers() -> None:
    inner = FaultyBackend(lambda call: NotFoundError(f"no layer {call.layer}"))
    cache = CacheBackend(inner, router_version=lambda layer: ["v0"][layer], stateful=False)
    with pytest.raises(NotFoundError, match="no layer 5"):
        asyncio.run(cache.route(make_call(layer=5)))
    assert cache.stats().bypass_count == 1 and cache.stats().size == 0


def test_stateful_routers_pass_through() -> None:
    inner = TopKBackend()
    cache = _cache(inner, stateful=True)
    call = make_call()
    results = asyncio.run(_route_n(cache, [call, call]))
    assert inner.calls == 2 and not any(r.cache_hit for r in results)
    assert cache.stats().bypass_count == 2 and cache.stats().size == 0


def test_stochastic_routers_are_cached_only_with_a_seed() -> None:
    inner = TopKBackend()
    cache = _cache(inner, stochastic=lambda call: call.router == "noisy")
    unseeded = make_call(router="noisy")
    seeded = make_call(router="noisy", seed=3)
    results = asyncio.run(_route_n(cache, [unseeded, unseeded, seeded, seeded]))
    assert [r.cache_hit for r in results] == [False, False, False, True]
    assert inner.calls == 3


def test_skip_cache_neither_reads_nor_fills() -> None:
    inner = TopKBackend()
    cache = _cache(inner)
    hs = make_call().hidden_states
    calls = [make_call(hs), make_call(hs, skip_cache=True), make_call(hs)]
    results = asyncio.run(_route_n(cache, calls))
    assert [r.cache_hit for r in results] == [False, False, True]
    fresh = _cache(TopKBackend())
    asyncio.run(_route_n(fresh, [make_call(hs, skip_cache=True)]))
    assert fresh.stats().size == 0
    assert fresh.stats().bypass_count == 1 and fresh.stats().miss_count == 0


def test_ttl_expires_entries(clock: FakeClock) -> None:
    inner = TopKBackend()
    cache = _cache(inner, ttl_seconds=10.0, clock=clock)
    call = make_call()

    async def run():
        await cache.route(call)
        clock.advance(9.9)
        second = await cache.route(call)
        clock.advance(0.2)
        third = await cache.route(call)
        return second, third

    second, third = asyncio.run(run())
    assert second.cache_hit and not third.cache_hit
    assert cache.stats().expirations == 1 and inner.calls == 2


def test_lru_entry_bound_evicts_least_recently_used() -> None:
    inner = TopKBackend()
    cache = _cache(inner, cache_size=2, adaptive=False)
    a, b, c = (make_call(seed_tensor=i) for i in range(3))
    results = asyncio.run(_route_n(cache, [a, b, a, c, a, b]))
    # a, b stored; a touched; c evicts b; a hits; b misses again
    assert [r.cache_hit for r in results] == [False, False, True, False, True, False]
    stats = cache.stats()
    assert stats.size == 2 and stats.evictions == 2 and stats.max_size == 2


def test_byte_bound_evicts_and_counts_bytes() -> None:
    inner = TopKBackend()
    one = asyncio.run(_route_n(inner, [make_call()]))[0]
    per_entry = output_nbytes(one.output)
    # [4, 2] int32 + [4, 2] f32 + [4] int32 + [4, 8] f32 logits + [8] int64 (no losses:
    # the call did not ask for them)
    assert per_entry == 32 + 32 + 16 + 128 + 64
    cache = _cache(inner, cache_size=100, max_bytes=2 * per_entry + 10, adaptive=False)
    asyncio.run(_route_n(cache, [make_call(seed_tensor=i) for i in range(5)]))
    stats = cache.stats()
    assert stats.size == 2 and stats.bytes == 2 * per_entry
    assert stats.evictions == 3 and stats.max_size == 100


def test_entry_larger_than_the_byte_bound_is_not_stored() -> None:
    cache = _cache(max_bytes=10)
    asyncio.run(_route_n(cache, [make_call(), make_call()]))
    assert cache.stats().size == 0 and cache.stats().hit_count == 0


def test_adaptive_grows_while_hits_are_high_up_to_four_times() -> None:
    cache = _cache(cache_size=4, adaptive=True)
    hot = [make_call(seed_tensor=i) for i in range(3)]
    calls = []
    for window in range(6):
        # per window: one new cold key (evicts once the cache is full), the rest hot hits
        calls += [make_call(seed_tensor=100 + 10 * window + j) for j in range(5)]
        calls += [hot[i % 3] for i in range(ADAPT_WINDOW - 5)]
    asyncio.run(_route_n(cache, calls))
    assert cache.stats().max_size == 16  # 4 -> 8 -> 16, capped at 4 x cache_size


def test_adaptive_does_not_grow_when_hits_are_rare() -> None:
    cache = _cache(cache_size=4, adaptive=True)
    calls = [make_call(seed_tensor=i) for i in range(2 * ADAPT_WINDOW)]
    asyncio.run(_route_n(cache, calls))
    assert cache.stats().max_size == 4


def test_adaptive_shrinks_under_memory_pressure() -> None:
    rss = {"now": 10}
    cache = _cache(cache_size=8, adaptive=True, rss_limit_bytes=100,
                   rss_bytes=lambda: rss["now"])
    calls = [make_call(seed_tensor=i % 8) for i in range(ADAPT_WINDOW)]
    asyncio.run(_route_n(cache, calls))
    assert cache.stats().max_size == 8
    rss["now"] = 1000
    asyncio.run(_route_n(cache, calls))
    stats = cache.stats()
    assert stats.max_size == 4 and stats.size <= 4
    asyncio.run(_route_n(cache, calls * 2))
    assert cache.stats().max_size == 2  # floor: cache_size // 4


def test_adaptive_shrinks_entry_bound_when_bytes_run_out() -> None:
    inner = TopKBackend()
    per_entry = output_nbytes(asyncio.run(_route_n(inner, [make_call()]))[0].output)
    cache = _cache(inner, cache_size=40, max_bytes=12 * per_entry, adaptive=True)
    asyncio.run(_route_n(cache, [make_call(seed_tensor=i) for i in range(13)]))
    assert cache.stats().max_size == 12
    assert cache.stats().size == 12


def test_concurrent_identical_misses_compute_once() -> None:
    inner = TopKBackend()
    cache = _cache(inner)
    call = make_call()

    async def run():
        inner.gate = asyncio.Event()
        tasks = [asyncio.create_task(cache.route(call)) for _ in range(20)]
        await asyncio.sleep(0)
        inner.gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert inner.calls == 1
    assert sum(not r.cache_hit for r in results) == 1
    for r in results:
        torch.testing.assert_close(r.output.expert_weights, results[0].output.expert_weights)
    stats = cache.stats()
    assert stats.coalesced_count == 19 and stats.miss_count == 1


def test_single_flight_errors_reach_every_waiter_and_are_not_cached() -> None:
    failing = {"on": True}
    inner = FaultyBackend(lambda call: BackendError("device lost") if failing["on"] else None)
    cache = CacheBackend(inner, router_version="v", stateful=False)
    call = make_call()

    async def run():
        tasks = [asyncio.create_task(cache.route(call)) for _ in range(5)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failing["on"] = False
        after = await cache.route(call)
        return outcomes, after

    outcomes, after = asyncio.run(run())
    assert all(isinstance(o, BackendError) for o in outcomes)
    assert inner.calls == 2  # one failed flight for five callers, then one fresh call
    assert not after.cache_hit


def test_clear_drops_entries_but_keeps_counters() -> None:
    cache = _cache()
    call = make_call()
    asyncio.run(_route_n(cache, [call, call]))
    cache.clear()
    stats = cache.stats()
    assert stats.size == 0 and stats.bytes == 0 and stats.hit_count == 1
    assert not asyncio.run(_route_n(cache, [call]))[0].cache_hit


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"cache_size": 0}, "cache_size"), ({"max_bytes": -1}, "max_bytes"),
     ({"ttl_seconds": 0}, "ttl_seconds"), ({"cache_size": True}, "cache_size")],
)
def test_bad_arguments_fail_at_construction(kwargs, name) -> None:
    with pytest.raises(RouterConfigurationError, match=name):
        _cache(**kwargs)


def test_digest_matches_for_equal_tensors_of_any_layout() -> None:
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(0))
    assert tensor_digest(x.t().contiguous().t()) == tensor_digest(x)
    assert tensor_digest(x.to(torch.bfloat16)) != tensor_digest(x)


async def _route_n(backend, calls: list[RouteCall]):
    return [await backend.route(c) for c in calls]


def test_large_payloads_are_hashed_off_the_event_loop_and_still_hit(monkeypatch) -> None:
    import threading

    from moe_router.chain import cache as cache_module

    hashed_on: list[str] = []
    real_key = cache_module.cache_key

    def spying_key(call: RouteCall, version: str):
        hashed_on.append(threading.current_thread().name)
        return real_key(call, version)

    monkeypatch.setattr(cache_module, "cache_key", spying_key)
    monkeypatch.setattr(cache_module, "_HASH_OFF_LOOP_BYTES", 0)  # every payload is "large"
    inner = TopKBackend()
    cache = _cache(inner)
    call = make_call()

    async def run():
        return await cache.route(call), await cache.route(call)

    miss, hit = asyncio.run(run())
    assert inner.calls == 1 and hit.cache_hit and not miss.cache_hit
    assert hashed_on and all(name != "MainThread" for name in hashed_on)


def test_the_cache_key_holds_the_token_ids() -> None:
    from moe_router.chain.backend import RouteOptions

    hidden = torch.zeros(2, HIDDEN)
    keys = {
        cache_key(RouteCall("r", 0, hidden, RouteOptions(input_ids=ids)), "v")
        for ids in (None, torch.tensor([1, 2]), torch.tensor([2, 1]), torch.tensor([1, 2]))
    }
    assert len(keys) == 3  # no ids, [1, 2] (twice), [2, 1]
