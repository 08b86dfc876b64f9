"""Timeouts: a deadline around one awaitable, and a timeout that adapts to observed latency.

``with_timeout`` turns an expired deadline into ``CallTimeoutError`` (which the breaker counts
as a failure and ``classify`` calls TIMEOUT) while letting cancellation from outside pass
through untouched. ``AdaptiveTimeout`` follows the p95 of recent successful calls, so a
dependency that usually answers in 2 s is not given 30 s to hang, and a slow-but-working one
is not cut off at an arbitrary fixed value.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from resilience.clock import Clock, SystemClock
from resilience.errors import CallTimeoutError

T = TypeVar("T")


# ASYNC109: the deadline is the whole point of this helper; it is applied with asyncio.timeout.
async def with_timeout(
    awaitable_factory: Callable[[], Awaitable[T]],
    timeout: float,  # noqa: ASYNC109
    operation: str,
) -> T:
    """Await ``awaitable_factory()`` for at most ``timeout`` seconds.

    Raises ``CallTimeoutError(operation, timeout)`` (chained from the ``TimeoutError``) when
    this deadline expires. A ``TimeoutError`` raised by the awaited code itself, before the
    deadline, propagates unchanged; so does ``CancelledError`` from outside.
    """
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await awaitable_factory()
    except TimeoutError as exc:
        # Only our own deadline becomes CallTimeoutError; an inner timeout keeps its identity.
        if deadline.expired():
            raise CallTimeoutError(operation, timeout) from exc
        raise


class AdaptiveTimeout:
    """A timeout that tracks the p95 of recent successful durations.

    ``current()`` is ``base`` until ``min_samples`` durations were recorded, then
    ``p95(last window durations) * multiplier`` clamped to ``[minimum, maximum]``. Only
    successes should be recorded: a timed-out call's duration is the timeout itself, and
    feeding it back would ratchet the timeout up during an outage.
    """

    def __init__(
        self,
        base: float,
        *,
        minimum: float,
        maximum: float,
        multiplier: float = 1.5,
        min_samples: int = 10,
        window: int = 200,
        clock: Clock | None = None,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"need 0 < minimum <= maximum, got minimum={minimum} maximum={maximum}")
        if window < 1 or min_samples < 1 or multiplier <= 0:
            raise ValueError("window and min_samples must be >= 1 and multiplier > 0")
        self.base = min(max(base, minimum), maximum)
        self.minimum = minimum
        self.maximum = maximum
        self.multiplier = multiplier
        self.min_samples = min(min_samples, window)
        self._clock: Clock = clock or SystemClock()
        self._recent: deque[float] = deque(maxlen=window)
        # Kept sorted alongside the deque so current() is O(1) and record() is O(window) memmove.
        self._sorted: list[float] = []
        self._current = self.base

    @property
    def samples(self) -> int:
        """How many durations are in the window."""
        return len(self._recent)

    def current(self) -> float:
        """The timeout to use for the next call, in seconds."""
        return self._current

    def record(self, duration: float) -> None:
        """Record the duration of one successful call; negative or non-finite values are ignored."""
        if not math.isfinite(duration) or duration < 0:
            return
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._recent.append(duration)
        bisect.insort(self._sorted, duration)
        self._current = self._compute()

    def percentile(self, fraction: float) -> float | None:
        """Nearest-rank percentile of the window (``fraction`` in (0, 1]); None when empty."""
        if not self._sorted:
            return None
        rank = max(1, math.ceil(fraction * len(self._sorted)))
        return self._sorted[min(rank, len(self._sorted)) - 1]

    async def call(self, awaitable_factory: Callable[[], Awaitable[T]], operation: str) -> T:
        """Run under ``with_timeout(current())`` and record the duration when it succeeds."""
        started = self._clock.monotonic()
        result = await with_timeout(awaitable_factory, self._current, operation)
        self.record(self._clock.monotonic() - started)
        return result

    def _compute(self) -> float:
        """Recompute the timeout from the window."""
        p95 = self.percentile(0.95)
        if p95 is None or len(self._sorted) < self.min_samples:
            return self.base
        return min(max(p95 * self.multiplier, self.minimum), self.maximum)
