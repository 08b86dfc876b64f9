"""KeyedMutex: per-key order, cross-key concurrency, timeouts, forced release, eviction."""

from __future__ import annotations

import asyncio

import pytest

from resilience.clock import FakeClock
from resilience.errors import MutexTimeoutError
from resilience.mutex import KeyedMutex


async def _settle(rounds: int = 5) -> None:
    """Let the other tasks run a few steps (no real waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_same_key_runs_in_arrival_order_one_at_a_time() -> None:
    """Holders of one key never overlap and enter in the order they arrived."""
    mutex = KeyedMutex()
    entered: list[int] = []
    inside = 0
    max_inside = 0

    async def worker(i: int) -> None:
        nonlocal inside, max_inside
        async with mutex.acquire("chan", timeout=1.0, holder=f"w{i}"):
            inside += 1
            max_inside = max(max_inside, inside)
            entered.append(i)
            await asyncio.sleep(0)
            inside -= 1

    async with asyncio.timeout(2):
        await asyncio.gather(*(worker(i) for i in range(10)))
    assert entered == list(range(10))
    assert max_inside == 1
    assert mutex.acquisitions == 10
    assert mutex.waits == 9
    assert not mutex.locked("chan")


async def test_different_keys_are_held_concurrently() -> None:
    """Holding one key does not block another key."""
    mutex = KeyedMutex()
    release = asyncio.Event()
    both_inside = asyncio.Event()
    inside: set[str] = set()

    async def worker(key: str) -> None:
        async with mutex.acquire(key, timeout=1.0):
            inside.add(key)
            if len(inside) == 2:
                both_inside.set()
            await release.wait()

    tasks = [asyncio.create_task(worker(k)) for k in ("a", "b")]
    async with asyncio.timeout(2):
        await both_inside.wait()
        assert mutex.locked("a") and mutex.locked("b")
        release.set()
        await asyncio.gather(*tasks)
    assert mutex.waits == 0


async def test_acquire_timeout_raises_and_leaves_lock_consistent() -> None:
    """A waiter that times out gets MutexTimeoutError; the holder keeps the lock; the next acquire works."""
    mutex = KeyedMutex()
    release = asyncio.Event()
    holding = asyncio.Event()

    async def holder() -> None:
        async with mutex.acquire("k", timeout=1.0, holder="first"):
            holding.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await holding.wait()
    with pytest.raises(MutexTimeoutError) as info:
        async with mutex.acquire("k", timeout=0.02):
            pytest.fail("must not enter")
    assert info.value.key == "k"
    assert info.value.timeout == 0.02
    assert mutex.timeouts == 1
    assert mutex.locked("k")
    assert [s.holder for s in mutex.status()] == ["first"]
    assert mutex.status()[0].waiters == 0

    release.set()
    await task
    assert not mutex.locked("k")
    async with asyncio.timeout(1), mutex.acquire("k", timeout=0.02):
        assert mutex.locked("k")
    assert not mutex.locked("k")


async def test_cancelled_waiter_does_not_leak_the_lock() -> None:
    """Cancelling a waiter (even one already woken) leaves the lock free for the next one."""
    mutex = KeyedMutex()
    release = asyncio.Event()
    holding = asyncio.Event()
    third_entered = asyncio.Event()

    async def holder() -> None:
        async with mutex.acquire("k", timeout=1.0):
            holding.set()
            await release.wait()

    async def waiter() -> None:
        async with mutex.acquire("k", timeout=5.0):
            pytest.fail("cancelled waiter must not enter")

    async def third() -> None:
        async with mutex.acquire("k", timeout=5.0):
            third_entered.set()

    h = asyncio.create_task(holder())
    await holding.wait()
    w = asyncio.create_task(waiter())
    await _settle()
    t = asyncio.create_task(third())
    await _settle()
    # Release and cancel in the same step: the waiter is woken, then cancelled before it runs.
    release.set()
    await _settle(1)
    w.cancel()
    async with asyncio.timeout(2):
        await h
        with pytest.raises(asyncio.CancelledError):
            await w
        await third_entered.wait()
        await t
    assert not mutex.locked("k")
    assert mutex.status() == []


async def test_force_release_hands_the_lock_on_and_stale_exit_releases_nothing() -> None:
    """A stuck holder is forced out; the next waiter runs; the stuck holder's late exit keeps the new lock."""
    clock = FakeClock()
    mutex = KeyedMutex(clock=clock)
    stuck_forever = asyncio.Event()
    stuck_inside = asyncio.Event()
    second_inside = asyncio.Event()
    second_may_leave = asyncio.Event()

    async def stuck() -> None:
        async with mutex.acquire("k", timeout=1.0, holder="stuck"):
            stuck_inside.set()
            await stuck_forever.wait()

    async def second() -> None:
        async with mutex.acquire("k", timeout=5.0, holder="second"):
            second_inside.set()
            await second_may_leave.wait()

    s = asyncio.create_task(stuck())
    await stuck_inside.wait()
    clock.advance(42.0)
    n = asyncio.create_task(second())
    await _settle()
    [row] = mutex.status()
    assert (row.key, row.holder, row.held_for, row.waiters) == ("k", "stuck", 42.0, 1)
    assert not second_inside.is_set()

    assert mutex.force_release("k") is True
    async with asyncio.timeout(2):
        await second_inside.wait()
    assert mutex.forced_releases == 1
    assert [r.holder for r in mutex.status()] == ["second"]

    # The stuck holder finally leaves: it must not free the lock that "second" holds now.
    stuck_forever.set()
    await s
    assert mutex.locked("k")
    assert [r.holder for r in mutex.status()] == ["second"]
    with pytest.raises(MutexTimeoutError):
        async with mutex.acquire("k", timeout=0.01):
            pytest.fail("the lock still belongs to 'second'")

    second_may_leave.set()
    await n
    assert not mutex.locked("k")
    assert mutex.force_release("k") is False


async def test_force_release_of_unknown_or_free_key_returns_false() -> None:
    """Forcing a key nobody holds does nothing."""
    mutex = KeyedMutex()
    assert mutex.force_release("nope") is False
    async with mutex.acquire("k", timeout=1.0):
        pass
    assert mutex.force_release("k") is False
    assert mutex.forced_releases == 0


async def test_idle_keys_are_evicted_lru_but_held_keys_never() -> None:
    """The map stays bounded by evicting idle keys oldest first; a held key survives any churn."""
    mutex = KeyedMutex(max_idle_keys=3)
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold() -> None:
        async with mutex.acquire("held", timeout=1.0, holder="h"):
            holding.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await holding.wait()
    for i in range(50):
        async with mutex.acquire(f"idle{i}", timeout=1.0):
            pass
        assert len(mutex) <= 3
        assert mutex.locked("held")
    assert set(mutex._slots) == {"held", "idle48", "idle49"}
    # The held key still excludes: a second acquire of it times out.
    with pytest.raises(MutexTimeoutError):
        async with mutex.acquire("held", timeout=0.01):
            pass
    release.set()
    await task
    assert not mutex.locked("held")


async def test_awaited_key_is_not_evicted() -> None:
    """A key with a waiter stays in the map, so the waiter and a newcomer share one lock."""
    mutex = KeyedMutex(max_idle_keys=1)
    release = asyncio.Event()
    holding = asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with mutex.acquire("k", timeout=1.0):
            holding.set()
            await release.wait()
            order.append("first")

    async def later(name: str) -> None:
        async with mutex.acquire("k", timeout=1.0):
            order.append(name)

    f = asyncio.create_task(first())
    await holding.wait()
    w = asyncio.create_task(later("waiter"))
    await _settle()
    async with mutex.acquire("other", timeout=1.0):
        pass
    n = asyncio.create_task(later("newcomer"))
    await _settle()
    release.set()
    async with asyncio.timeout(2):
        await asyncio.gather(f, w, n)
    assert order == ["first", "waiter", "newcomer"]

