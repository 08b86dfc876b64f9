"""A keyed asyncio mutex with an acquire timeout, operator views and a safe forced release.

One conversation (a channel or thread) runs in order; different conversations run
concurrently. The map of per-key records is bounded: idle keys are evicted least recently
used first, but a key that is held or awaited is never evicted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

from resilience.clock import Clock, SystemClock
from resilience.context import span
from resilience.errors import MutexTimeoutError

log = structlog.get_logger(__name__)


class _Slot:
    """The record kept per key (small on purpose: there may be thousands)."""

    __slots__ = ("generation", "held_since", "holder", "lock", "waiters")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.holder = ""
        self.held_since = 0.0
        self.waiters = 0
        # Bumped on every acquire and every forced release: an exiting holder releases only
        # if the generation is still the one it acquired, so a stale holder never frees a
        # lock that now belongs to someone else.
        self.generation = 0

    def busy(self) -> bool:
        return self.lock.locked() or self.waiters > 0


@dataclass(frozen=True, slots=True)
class LockStatus:
    """One held or awaited key, as shown to operators."""

    key: str
    holder: str
    held_for: float
    waiters: int


class _Guard:
    """The async context manager returned by ``KeyedMutex.acquire``."""

    __slots__ = ("_holder", "_key", "_mutex", "_slot", "_timeout", "_token")

    def __init__(self, mutex: KeyedMutex, key: str, timeout: float, holder: str) -> None:
        self._mutex = mutex
        self._key = key
        self._timeout = timeout
        self._holder = holder
        self._slot: _Slot | None = None
        self._token = -1

    async def __aenter__(self) -> None:
        self._slot, self._token = await self._mutex._acquire(self._key, self._timeout, self._holder)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._mutex._release(self._key, slot, self._token)


class KeyedMutex:
    """Per-key mutual exclusion with an acquire timeout.

    ``async with mutex.acquire(key, timeout=5.0, holder="msg 123"):`` raises
    ``MutexTimeoutError(key, timeout)`` when the lock is not acquired in time; a timed-out or
    cancelled waiter never keeps the lock. ``status()`` and ``force_release(key)`` are for
    operators; ``acquisitions``, ``waits``, ``timeouts`` and ``forced_releases`` are counters
    for metrics. ``wait_observer`` (settable), when given, is called with the seconds each
    acquire that had to wait spent waiting (a timed-out one with its limit); an uncontended
    acquire never waits and costs nothing extra.
    """

    def __init__(self, max_idle_keys: int = 10_000, clock: Clock | None = None) -> None:
        if max_idle_keys < 1:
            raise ValueError("max_idle_keys must be at least 1")
        self._max_idle_keys = max_idle_keys
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self.acquisitions = 0
        self.waits = 0
        self.timeouts = 0
        self.forced_releases = 0
        self.wait_observer: Callable[[float], None] | None = None

    def acquire(self, key: str, timeout: float, holder: str = "") -> _Guard:
        """Return an async context manager holding ``key``'s lock; wait at most ``timeout`` s."""
        return _Guard(self, key, timeout, holder)

    def locked(self, key: str) -> bool:
        """Whether ``key`` is currently held."""
        slot = self._slots.get(key)
        return slot is not None and slot.lock.locked()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def max_idle_keys(self) -> int:
        """How many keys are kept at most, not counting keys held or awaited (never evicted)."""
        return self._max_idle_keys

    def status(self) -> list[LockStatus]:
        """The held or awaited keys, longest held first."""
        now = self._clock.monotonic()
        rows = [
            LockStatus(key, slot.holder, now - slot.held_since if slot.lock.locked() else 0.0, slot.waiters)
            for key, slot in self._slots.items()
            if slot.busy()
        ]
        rows.sort(key=lambda r: r.held_for, reverse=True)
        return rows

    def counters(self) -> dict[str, int]:
        """The metric counters by name."""
        return {
            "acquisitions": self.acquisitions,
            "waits": self.waits,
            "timeouts": self.timeouts,
            "forced_releases": self.forced_releases,
        }

    def force_release(self, key: str) -> bool:
        """Free a stuck holder's lock so the next waiter gets it; False if ``key`` is not held.

        The stuck holder keeps running; when it finally leaves its ``async with`` it notices
        that its generation is stale and releases nothing.
        """
        slot = self._slots.get(key)
        if slot is None or not slot.lock.locked():
            return False
        log.warning(
            "mutex_force_release",
            key=key,
            holder=slot.holder,
            held_for=round(self._clock.monotonic() - slot.held_since, 3),
            waiters=slot.waiters,
        )
        slot.generation += 1
        slot.holder = ""
        self.forced_releases += 1
        slot.lock.release()
        return True

    async def _acquire(self, key: str, limit: float, holder: str) -> tuple[_Slot, int]:
        with span("mutex.wait", key=key, dependency="mutex") as step:
            slot = await self._take(key, limit, step)
        slot.generation += 1
        slot.holder = holder
        slot.held_since = self._clock.monotonic()
        self.acquisitions += 1
        return slot, slot.generation

    async def _take(self, key: str, limit: float, step: Any) -> _Slot:
        """Wait for ``key``'s lock (``step`` is the trace's span of the wait)."""
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= self._max_idle_keys:
                self._evict(room=1)
            slot = self._slots[key] = _Slot()
        else:
            self._slots.move_to_end(key)
        lock = slot.lock
        if not lock.locked() and slot.waiters == 0:
            # Fast path: Lock.acquire returns without suspending, so no timeout is needed.
            await lock.acquire()
        else:
            step.set(waited=True)
            self.waits += 1
            slot.waiters += 1
            started = self._clock.monotonic()
            try:
                async with asyncio.timeout(limit):
                    await lock.acquire()
            except TimeoutError:
                # Lock.acquire hands a wake-up it cannot use to the next waiter, so a timed-out
                # (or cancelled) waiter never owns the lock here.
                self.timeouts += 1
                self._observe_wait(limit)
                raise MutexTimeoutError(key, limit) from None
            finally:
                slot.waiters -= 1
            self._observe_wait(self._clock.monotonic() - started)
        return slot

    def _observe_wait(self, seconds: float) -> None:
        observer = self.wait_observer
        if observer is not None:
            try:
                observer(max(0.0, seconds))
            except Exception as exc:  # a broken metrics hook must not break the lock
                log.warning("mutex_wait_observer_failed", error=repr(exc))

    def _release(self, key: str, slot: _Slot, token: int) -> None:
        if slot.generation != token or not slot.lock.locked():
            log.warning("mutex_stale_release_ignored", key=key)
            return
        slot.holder = ""
        slot.lock.release()

    def trim(self) -> int:
        """Forget every idle key (memory pressure); held or awaited locks stay. Returns how many went."""
        idle = [key for key, slot in self._slots.items() if not slot.busy()]
        for key in idle:
            del self._slots[key]
        return len(idle)

    def _evict(self, room: int) -> None:
        """Drop idle keys, least recently used first, to make ``room`` within the bound."""
        excess = len(self._slots) + room - self._max_idle_keys
        if excess <= 0:
            return
        victims: list[str] = []
        for key, slot in self._slots.items():
            if not slot.busy():
                victims.append(key)
                if len(victims) >= excess:
                    break
        for key in victims:
            del self._slots[key]
