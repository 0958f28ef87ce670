"""RateLimitBackend: a token bucket per caller on an injected clock, over a real router."""

from __future__ import annotations

import asyncio

import pytest
from chain_backends import FakeClock, TopKBackend, make_call

from moe_router.chain.ratelimit import RateLimitBackend
from moe_router.errors import OverloadedError, RouterConfigurationError


async def _try(limiter: RateLimitBackend, peer: str, n: int = 1) -> list[object]:
    out = []
    for _ in range(n):
        try:
            out.append(await limiter.route(make_call(peer=peer)))
        except OverloadedError as exc:
            out.append(exc)
    return out


def test_trips_after_the_burst_and_recovers_at_the_hourly_rate(clock: FakeClock) -> None:
    inner = TopKBackend()
    limiter = RateLimitBackend(inner, requests_per_hour=3600, burst=3, clock=clock)  # 1 per s
    outcomes = asyncio.run(_try(limiter, "alice", 4))
    assert [isinstance(o, OverloadedError) for o in outcomes] == [False, False, False, True]
    refused = outcomes[3]
    assert refused.reason == "RATE_LIMITED"
    assert refused.retry_after_s == pytest.approx(1.0)
    assert inner.calls == 3
    clock.advance(0.5)
    half = asyncio.run(_try(limiter, "alice"))[0]
    assert isinstance(half, OverloadedError) and half.retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert not isinstance(asyncio.run(_try(limiter, "alice"))[0], OverloadedError)
    stats = limiter.stats()
    assert stats.limited_calls == 2 and stats.admitted_calls == 4


def test_each_caller_has_its_own_bucket(clock: FakeClock) -> None:
    limiter = RateLimitBackend(TopKBackend(), requests_per_hour=60, burst=1, clock=clock)
    assert not isinstance(asyncio.run(_try(limiter, "alice"))[0], OverloadedError)
    assert isinstance(asyncio.run(_try(limiter, "alice"))[0], OverloadedError)
    assert not isinstance(asyncio.run(_try(limiter, "bob"))[0], OverloadedError)


def test_default_burst_is_a_minutes_worth(clock: FakeClock) -> None:
    limiter = RateLimitBackend(TopKBackend(), requests_per_hour=1000, clock=clock)
    outcomes = asyncio.run(_try(limiter, "alice", 18))
    assert sum(not isinstance(o, OverloadedError) for o in outcomes) == 17  # ceil(1000/60)
    tiny = RateLimitBackend(TopKBackend(), requests_per_hour=10, clock=clock)
    assert tiny.stats().burst == 1


def test_refill_never_exceeds_the_burst(clock: FakeClock) -> None:
    limiter = RateLimitBackend(TopKBackend(), requests_per_hour=3600, burst=2, clock=clock)
    asyncio.run(_try(limiter, "alice", 2))
    clock.advance(3600.0)
    outcomes = asyncio.run(_try(limiter, "alice", 3))
    assert [isinstance(o, OverloadedError) for o in outcomes] == [False, False, True]


def test_idle_buckets_are_forgotten_and_memory_is_bounded(clock: FakeClock) -> None:
    limiter = RateLimitBackend(TopKBackend(), requests_per_hour=3600, burst=2, max_callers=3,
                               clock=clock)
    asyncio.run(_try(limiter, "a"))
    asyncio.run(_try(limiter, "b"))
    clock.advance(2.0)  # both full again: dropping them changes nothing
    asyncio.run(_try(limiter, "c"))
    assert limiter.stats().tracked_callers == 1
    for peer in "defgh":
        asyncio.run(_try(limiter, peer))
    assert limiter.stats().tracked_callers == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"requests_per_hour": 0}, "requests_per_hour"),
     ({"requests_per_hour": 10, "burst": 0}, "burst"),
     ({"requests_per_hour": 10, "max_callers": -1}, "max_callers")],
)
def test_bad_arguments_fail_at_construction(kwargs, name) -> None:
    with pytest.raises(RouterConfigurationError, match=name):
        RateLimitBackend(TopKBackend(), **kwargs)


def test_limiters_sharing_buckets_hold_one_quota_across_routers(clock: FakeClock) -> None:
    first = RateLimitBackend(TopKBackend(), requests_per_hour=3600, burst=2, clock=clock)
    second = RateLimitBackend(
        TopKBackend(), requests_per_hour=3600, burst=2, clock=clock, shared_with=first
    )
    assert not any(isinstance(o, OverloadedError) for o in asyncio.run(_try(first, "bob", 2)))
    (refused,) = asyncio.run(_try(second, "bob"))
    assert isinstance(refused, OverloadedError) and refused.reason == "RATE_LIMITED"
    assert not isinstance(asyncio.run(_try(second, "carol"))[0], OverloadedError)
    with pytest.raises(RouterConfigurationError, match="shared_with"):
        RateLimitBackend(TopKBackend(), requests_per_hour=60, clock=clock, shared_with=first)
