"""BusyPollSelector: polls only right after a wake-up with events, never while idle or
vetoed, and returns as soon as something is ready; an asyncio loop runs on it."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

import pytest

from moe_router.doors.busy_poll import BusyPollSelector


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _selector(spin_s: float, sock: socket.socket, may_spin=None) -> BusyPollSelector:
    selector = BusyPollSelector(spin_s, may_spin)
    selector.register(sock, selectors.EVENT_READ)
    return selector


def _arm(selector: BusyPollSelector, a: socket.socket, b: socket.socket) -> None:
    """One wake-up with an event (read and consumed): the next select may poll."""
    b.send(b"x")
    assert selector.select(1.0)
    a.recv(1)


def test_polls_after_events_then_sleeps_without_polling_again(pair) -> None:
    a, b = pair
    selector = _selector(0.01, a)
    b.send(b"x")
    assert selector.select(1.0)  # ready at once: no poll needed
    assert selector.polls == 0
    a.recv(1)
    assert selector.select(0.05) == []  # armed: polls about 10 ms, then sleeps the rest
    assert selector.polls > 1
    polls = selector.polls
    assert selector.select(0.02) == []  # idle since: sleeps at once
    assert selector.polls == polls


def test_an_event_during_the_poll_returns_at_once(pair) -> None:
    a, b = pair
    selector = _selector(5.0, a)
    _arm(selector, a, b)
    threading.Timer(0.01, b.send, (b"y",)).start()
    started = time.monotonic()
    events = selector.select(None)
    assert events and events[0][0].fileobj is a
    assert time.monotonic() - started < 4.0  # not the 5 s budget
    assert selector.polls > 0


def test_vetoed_or_zero_budget_never_polls(pair) -> None:
    a, b = pair
    for selector in (_selector(0.05, a, may_spin=lambda: False), _selector(0.0, a)):
        _arm(selector, a, b)
        assert selector.select(0.01) == []
        assert selector.polls == 0
        selector.close()


def test_the_loop_timeout_bounds_the_poll(pair) -> None:
    a, b = pair
    selector = _selector(10.0, a)
    _arm(selector, a, b)
    started = time.monotonic()
    assert selector.select(0.02) == []
    assert time.monotonic() - started < 5.0  # the loop's 20 ms, not the 10 s budget


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="spin_s must be >= 0"):
        BusyPollSelector(-1.0)


def test_an_asyncio_loop_serves_ping_pong_on_it(pair) -> None:
    a, b = pair
    selector = BusyPollSelector(0.001)
    loop = asyncio.SelectorEventLoop(selector)
    b.setblocking(False)

    async def ping_pong() -> list[bytes]:
        answers = []
        loop.add_reader(a.fileno(), lambda: a.send(a.recv(16).upper()))
        for word in (b"one", b"two", b"three"):
            await loop.sock_sendall(b, word)
            answers.append(await loop.sock_recv(b, 16))
        loop.remove_reader(a.fileno())
        return answers

    try:
        assert loop.run_until_complete(ping_pong()) == [b"ONE", b"TWO", b"THREE"]
    finally:
        loop.close()
    assert selector.polls > 0
