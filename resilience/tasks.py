"""Supervised background loops: run every interval, time-boxed, back off, disable and alert.

Modelled on discord.py's ``ext/tasks``: ``CancelledError`` always propagates, failures back
off, cleanup happens in ``finally``. Time comes from an injected ``Clock``, so a test drives
hours of loop in milliseconds with ``FakeClock``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog

from resilience.clock import Clock, SystemClock
from resilience.errors import CallTimeoutError

log = structlog.get_logger(__name__)

Backoff = Callable[[int], float]
"""Seconds to wait after the ``n``-th consecutive failure (``n`` starts at 1)."""

AlertHook = Callable[[str, BaseException], object]
"""Called as ``on_alert(task_name, last_exception)`` when a task disables itself; may be async."""


def exponential_backoff(base: float = 1.0, cap: float = 300.0, factor: float = 2.0) -> Backoff:
    """``base * factor**(n-1)`` seconds after the n-th consecutive failure, at most ``cap``."""

    def backoff(attempt: int) -> float:
        return min(cap, base * factor ** max(0, attempt - 1))

    return backoff


class TaskState(StrEnum):
    CREATED = "created"
    RUNNING = "running"      # inside fn
    SLEEPING = "sleeping"    # waiting for the next interval
    BACKING_OFF = "backing_off"
    DISABLED = "disabled"    # too many consecutive failures; enable() to resume
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class TaskStats:
    """A snapshot of a supervised task's counters (times are ``Clock.monotonic()``)."""

    runs: int
    failures: int
    consecutive_failures: int
    last_error: str | None
    last_run_at: float | None
    last_success_at: float | None
    disabled: bool


class SupervisedTask:
    """Runs ``fn`` every ``interval`` seconds under ``run_timeout``, with backoff and an alert.

    After a failure the next run waits ``backoff(consecutive_failures)`` instead of
    ``interval``; after ``max_consecutive_failures`` in a row the task disables itself and
    calls ``on_alert(name, exc)``. Failures are logged with their stack, except instances of
    ``expected`` (a dependency that is down). ``wake()`` runs it now (e.g. when a breaker closes);
    ``enable()`` re-arms a disabled task; ``await stop()`` cancels and awaits it cleanly.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[], Awaitable[None]],
        *,
        interval: float,
        run_timeout: float,
        backoff: Backoff | None = None,
        max_consecutive_failures: int = 5,
        on_alert: AlertHook | None = None,
        clock: Clock | None = None,
        expected: tuple[type[BaseException], ...] = (),
    ) -> None:
        if interval < 0 or run_timeout <= 0 or max_consecutive_failures < 1:
            raise ValueError("interval >= 0, run_timeout > 0 and max_consecutive_failures >= 1 are required")
        self.name = name
        self._fn = fn
        self._interval = interval
        self._run_timeout = run_timeout
        self._backoff = backoff if backoff is not None else exponential_backoff(cap=max(300.0, interval))
        self._max_failures = max_consecutive_failures
        self._on_alert = on_alert
        self._clock: Clock = clock if clock is not None else SystemClock()
        # A dependency being down is no bug: its failures are logged without the stack.
        self._expected = expected
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.state = TaskState.CREATED
        self._runs = 0
        self._failures = 0
        self._consecutive = 0
        self._last_error: str | None = None
        self._last_exc: BaseException | None = None
        self._last_run_at: float | None = None
        self._last_success_at: float | None = None

    @property
    def stats(self) -> TaskStats:
        """The counters as a snapshot."""
        return TaskStats(
            runs=self._runs,
            failures=self._failures,
            consecutive_failures=self._consecutive,
            last_error=self._last_error,
            last_run_at=self._last_run_at,
            last_success_at=self._last_success_at,
            disabled=self.state is TaskState.DISABLED,
        )

    @property
    def running(self) -> bool:
        """Whether the loop task exists and has not finished."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop (first run immediately); a no-op if it is already running."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"supervised:{self.name}")

    def wake(self) -> None:
        """Run now instead of waiting out the current interval or backoff (not if disabled)."""
        self._wake.set()

    def enable(self) -> None:
        """Re-arm a disabled task: reset the failure streak and start the loop again."""
        if self.state is TaskState.DISABLED:
            self._consecutive = 0
            self.state = TaskState.CREATED
            self.start()

    async def stop(self) -> None:
        """Cancel the loop and wait for it to finish; safe to call twice or before start."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller is being cancelled too: do not swallow that
        elif task is not None and not task.cancelled() and task.exception() is not None:
            # Retrieve it so asyncio does not report "Task exception was never retrieved".
            log.error("supervised_task_crashed", task=self.name, error=repr(task.exception()))
        if self.state is not TaskState.DISABLED:
            self.state = TaskState.STOPPED

    async def run_once(self) -> bool:
        """One time-boxed run of ``fn``; returns whether it succeeded (failures are recorded)."""
        self.state = TaskState.RUNNING
        self._runs += 1
        self._last_run_at = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._run_timeout):
                await self._fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and not isinstance(exc, CallTimeoutError):
                timeout_exc = CallTimeoutError(f"task {self.name}", self._run_timeout)
                timeout_exc.__cause__ = exc
                exc = timeout_exc
            self._record_failure(exc)
            return False
        self._consecutive = 0
        self._last_error = None
        self._last_exc = None
        self._last_success_at = self._clock.monotonic()
        return True

    async def _loop(self) -> None:
        try:
            while True:
                ok = await self.run_once()
                if not ok and self._consecutive >= self._max_failures:
                    self.state = TaskState.DISABLED
                    await self._alert()
                    return
                if ok:
                    self.state = TaskState.SLEEPING
                    await self._pause(self._interval)
                else:
                    self.state = TaskState.BACKING_OFF
                    await self._pause(self._backoff(self._consecutive))
        finally:
            if self.state is not TaskState.DISABLED:
                self.state = TaskState.STOPPED

    def _record_failure(self, exc: BaseException) -> None:
        self._failures += 1
        self._consecutive += 1
        self._last_error = repr(exc)
        self._last_exc = exc
        log.warning(
            "supervised_task_failed",
            task=self.name,
            consecutive_failures=self._consecutive,
            error=repr(exc),
            exc_info=None if isinstance(exc, self._expected) else exc,
        )

    async def _alert(self) -> None:
        log.error("supervised_task_disabled", task=self.name, consecutive_failures=self._consecutive)
        if self._on_alert is None:
            return
        exc = self._last_exc if self._last_exc is not None else RuntimeError("disabled")
        try:
            result = self._on_alert(self.name, exc)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as hook_exc:
            log.error("supervised_task_alert_failed", task=self.name, error=repr(hook_exc), exc_info=hook_exc)

    async def _pause(self, seconds: float) -> None:
        """Sleep on the injected clock, or less if ``wake()`` is called meanwhile."""
        if self._wake.is_set():
            self._wake.clear()
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waker):
                fut.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
        self._wake.clear()
