"""Circuit breakers for asyncio: an adapter over ``pybreaker.CircuitBreaker`` and a named board.

pybreaker stays the state machine: its storage holds the failure and success counters, its
state objects carry the state, and its listeners hear every transition. What pybreaker
cannot do under asyncio is done here:

- admission is synchronous and never awaits, so no lock is ever held across an ``await``;
- open turns half-open when the reset timeout has passed on the injected ``Clock`` (pybreaker
  reads ``datetime.now``, which tests cannot move);
- half-open admits exactly one probe, which holds a lease; everyone else is rejected fast;
- a cancelled call is "no outcome": it only gives its lease back;
- excluded (business) errors are never shown to pybreaker, which would count them as successes;
- ``Breaker.call`` runs the timeout *inside* the breaker, so a hang counts as a failure.

Outcomes are matched to the state they were admitted in (an epoch that moves on every
transition): a late answer from a call admitted before the breaker opened cannot close it,
and a probe that outlives a ``force_open`` or ``reset`` does not count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar

import pybreaker
import structlog

from resilience.clock import Clock
from resilience.errors import CallTimeoutError, CircuitOpenError

T = TypeVar("T")

Exclusion = type[BaseException] | Callable[[BaseException], bool]
"""An exception type, or a predicate on the exception, that marks a business error."""

StateListener = Callable[[str, "BreakerState", "BreakerState"], None]
"""``callback(breaker_name, old_state, new_state)``, called once per transition."""

_log = logging.getLogger(__name__)
_events = structlog.get_logger(__name__)


class BreakerState(StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN
_FROM_PYBREAKER = {
    pybreaker.STATE_CLOSED: _CLOSED,
    pybreaker.STATE_OPEN: _OPEN,
    pybreaker.STATE_HALF_OPEN: _HALF_OPEN,
}


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state for status views.

    ``since`` is the clock's wall time (``Clock.time()``) of the last transition;
    ``remaining`` the seconds until the next probe is allowed (0 unless open);
    ``last_error`` a short description of the last counted failure (type and status code,
    never the message, which may carry a URL with a key); ``forced_reason`` the reason
    given to ``force_open`` while that forced opening lasts.
    """

    name: str
    state: BreakerState
    since: float
    failures: int
    remaining: float
    last_error: str | None
    forced_reason: str | None


def describe_error(exc: BaseException) -> str:
    """Describe an exception without its message: the type name and any HTTP status code."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        code = getattr(exc, "status", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return f"{type(exc).__name__} ({code})"
    return type(exc).__name__


class _Relay(pybreaker.CircuitBreakerListener):
    """Feeds pybreaker's transitions to the adapter and to its subscribers."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[BreakerState, BreakerState], None]) -> None:
        self._callback = callback

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = _FROM_PYBREAKER[old_state.name] if old_state is not None else _CLOSED
        new = _FROM_PYBREAKER[new_state.name]
        if old is not new:
            self._callback(old, new)


class Lease:
    """The right to make one call through a breaker; report its outcome exactly once.

    Use it as a context manager around the call (``with breaker.admit(): await op()``): a
    clean exit records a success, an ``Exception`` a failure (unless excluded), and anything
    else (``CancelledError``) releases the lease with no outcome. Put any timeout *inside*
    the ``with`` block: a timeout outside it reaches the lease as a cancellation. Calls
    after the first report are ignored.
    """

    __slots__ = ("_breaker", "_done", "_epoch")

    def __init__(self, breaker: Breaker, epoch: int) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._done = False

    def record_success(self) -> None:
        """The call succeeded."""
        if not self._done:
            self._done = True
            self._breaker._succeeded(self._epoch)

    def record_failure(self, exc: BaseException) -> None:
        """The call failed with ``exc`` (an excluded error only releases the lease)."""
        if not self._done:
            self._done = True
            self._breaker._failed(self._epoch, exc)

    def release(self) -> None:
        """The call ended with no outcome (cancelled): give the probe slot back."""
        if not self._done:
            self._done = True
            self._breaker._released(self._epoch)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.record_success()
        elif isinstance(exc, Exception):
            self.record_failure(exc)
        else:
            self.release()


class Breaker:
    """An asyncio circuit breaker over a ``pybreaker.CircuitBreaker``, timed by an injected clock.

    Closed: calls run; ``fail_max`` consecutive counted failures open it. Open: calls are
    rejected with ``CircuitOpenError`` (carrying the seconds left) until ``reset_timeout``
    has passed, then the next caller becomes the half-open probe. Half-open: one probe at a
    time; ``success_threshold`` probe successes close it, a probe failure re-opens it, a
    cancelled or excluded probe frees the slot for the next caller.

    ``exclude`` lists business errors (types or predicates) that count neither way.
    ``describe`` turns a counted failure into the snapshot's ``last_error`` text.
    """

    __slots__ = (
        "_cause",
        "_cb",
        "_clock",
        "_describe",
        "_epoch",
        "_forced_reason",
        "_last_cause",
        "_last_error",
        "_name",
        "_open_until",
        "_probe_out",
        "_since",
        "_since_mono",
        "_state",
        "_storage",
    )

    def __init__(
        self,
        name: str,
        clock: Clock,
        *,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        success_threshold: int = 1,
        exclude: Iterable[Exclusion] = (),
        describe: Callable[[BaseException], str] = describe_error,
    ) -> None:
        if fail_max < 1 or success_threshold < 1:
            raise ValueError("fail_max and success_threshold must be at least 1")
        if reset_timeout < 0:
            raise ValueError("reset_timeout must not be negative")
        self._name = name
        self._clock = clock
        self._describe = describe
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        # Listed first so the adapter's view is current before any subscriber runs.
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            exclude=list(exclude),
            listeners=[_Relay(self._on_transition)],
            state_storage=self._storage,
            name=name,
            throw_new_error_on_trip=False,
        )
        self._state = _CLOSED
        self._epoch = 0
        self._since = clock.time()
        self._since_mono = clock.monotonic()
        self._cause = "start"
        self._last_cause = "start"
        self._open_until = 0.0
        self._probe_out = False
        self._forced_reason: str | None = None
        self._last_error: str | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The breaker's name on its board."""
        return self._name

    @property
    def state(self) -> BreakerState:
        """The current state (open stays open until a caller arrives after the reset timeout)."""
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive counted failures while closed (pybreaker's failure counter)."""
        return self._storage.counter

    @property
    def fail_max(self) -> int:
        """Consecutive failures that open the breaker."""
        return self._cb.fail_max

    @property
    def reset_timeout(self) -> float:
        """Seconds the breaker stays open before it admits a probe."""
        return self._cb.reset_timeout

    @property
    def circuit(self) -> pybreaker.CircuitBreaker:
        """The underlying pybreaker breaker (for its listeners; do not call through it)."""
        return self._cb

    @property
    def transition_cause(self) -> str:
        """Why the last transition happened: the error or count that opened it, a failed or
        successful probe, an operator's reset or forced opening (as logged with it)."""
        return self._last_cause

    def remaining_open(self) -> float:
        """Seconds until a probe is allowed: positive only while open."""
        if self._state is not _OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock.monotonic())

    def would_admit(self) -> bool:
        """Whether ``admit()`` would let a call through now (no side effects; for drain loops)."""
        if self._state is _CLOSED:
            return True
        if self._state is _OPEN:
            return self._open_until <= self._clock.monotonic()
        return not self._probe_out

    def admit(self) -> Lease:
        """Admit one call now or raise ``CircuitOpenError``; never awaits.

        The caller must report the outcome on the returned lease (or use it as a context
        manager); an unreported half-open lease keeps every other caller out.
        """
        return Lease(self, self._admit() if self._state is not _CLOSED else self._epoch)

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109 - it must run inside the breaker to be counted
        **kwargs: Any,
    ) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker and return its result.

        With ``timeout`` (seconds), the call runs under ``asyncio.timeout`` inside the
        breaker: expiry counts as a failure and raises ``CallTimeoutError(name, timeout)``.
        Raises ``CircuitOpenError`` without calling ``fn`` when the breaker rejects it.
        """
        epoch = self._epoch if self._state is _CLOSED else self._admit()
        if timeout is not None:
            return await self._call_with_timeout(epoch, timeout, fn, args, kwargs)
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._failed(epoch, exc)
            raise
        except BaseException:
            self._released(epoch)
            raise
        self._succeeded(epoch)
        return result

    def force_open(self, duration: float | None = None, reason: str = "") -> None:
        """Hold the breaker open for ``duration`` seconds (default: the reset timeout).

        For example, the bot holds the Gemini breaker open until a daily quota resets.
        Forcing an open breaker again only moves its end.
        """
        duration = self._cb.reset_timeout if duration is None else duration
        if duration < 0:
            raise ValueError("duration must not be negative")
        self._trip(self._clock.monotonic() + duration, reason or "forced open")

    def reset(self) -> None:
        """Close the breaker and clear its counters and last error (an operator action)."""
        if self._state is not _CLOSED:
            self._cause = "reset"
            self._cb.close()
        self._storage.reset_counter()
        self._storage.reset_success_counter()
        self._last_error = None
        self._forced_reason = None

    def add_listener(self, callback: StateListener) -> None:
        """Call ``callback(name, old_state, new_state)`` on each transition.

        Registered as a pybreaker listener; an exception in it is logged, not raised into
        the call that caused the transition.
        """
        name = self._name

        def relay(old: BreakerState, new: BreakerState) -> None:
            try:
                callback(name, old, new)
            except Exception:  # a broken metrics hook must not break the guarded call
                _log.exception("breaker listener failed", extra={"breaker": name})

        self._cb.add_listener(_Relay(relay))

    def snapshot(self) -> BreakerSnapshot:
        """The current state, for status views and the admin API."""
        return BreakerSnapshot(
            name=self._name,
            state=self._state,
            since=self._since,
            failures=self._storage.counter,
            remaining=self.remaining_open(),
            last_error=self._last_error,
            forced_reason=self._forced_reason,
        )

    def __repr__(self) -> str:
        return f"<Breaker {self._name!r} {self._state} failures={self._storage.counter}>"

    # -- internals --------------------------------------------------------------------

    def _admit(self) -> int:
        """Admission when not closed: the epoch of the probe, or ``CircuitOpenError``."""
        if self._state is _OPEN:
            remaining = self._open_until - self._clock.monotonic()
            if remaining > 0:
                raise CircuitOpenError(self._name, remaining)
            self._cause = "reset timeout passed: probing"
            self._cb.half_open()
        elif self._probe_out:
            raise CircuitOpenError(self._name, 0.0)
        self._probe_out = True
        return self._epoch

    def _succeeded(self, epoch: int) -> None:
        if epoch != self._epoch:
            return  # admitted in an earlier state: its outcome says nothing about now
        if self._state is _CLOSED:
            if self._storage.counter:
                self._storage.reset_counter()
            return
        self._storage.reset_counter()
        self._storage.increment_success_counter()
        if self._storage.success_counter >= self._cb.success_threshold:
            self._cause = "probe succeeded"
            self._cb.close()
        else:
            self._probe_out = False

    def _failed(self, epoch: int, exc: BaseException) -> None:
        if not self._cb.is_system_error(exc):
            self._released(epoch)  # pybreaker would count it as a success: never show it
            return
        if epoch != self._epoch:
            return
        self._last_error = self._describe(exc)
        self._storage.increment_counter()
        if self._state is _HALF_OPEN:
            self._cause = f"probe failed: {self._last_error}"
            self._trip(self._clock.monotonic() + self._cb.reset_timeout, None)
        elif self._storage.counter >= self._cb.fail_max:
            self._cause = f"{self._storage.counter} failures in a row, the last {self._last_error}"
            self._trip(self._clock.monotonic() + self._cb.reset_timeout, None)

    def _released(self, epoch: int) -> None:
        if epoch == self._epoch and self._state is _HALF_OPEN:
            self._probe_out = False

    def _trip(self, until: float, reason: str | None) -> None:
        self._open_until = until
        if self._state is not _OPEN:
            if reason is not None:
                self._cause = f"forced open: {reason}"
            self._cb.open()
        self._forced_reason = reason

    def _on_transition(self, old: BreakerState, new: BreakerState) -> None:
        now = self._clock.monotonic()
        lasted = now - self._since_mono
        cause, self._cause = self._cause, "unknown"
        self._last_cause = cause
        self._state = new
        self._epoch += 1
        self._since = self._clock.time()
        self._since_mono = now
        self._probe_out = False
        if new is not _OPEN:
            self._forced_reason = None
        # Every transition, with why and how long the state it leaves lasted: the log says what a
        # metric cannot (which error opened it, how long an outage was).
        log = _events.warning if new is _OPEN else _events.info
        log(
            "breaker.transition",
            breaker=self._name,
            from_state=str(old),
            to_state=str(new),
            cause=cause,
            previous_state_seconds=round(lasted, 3),
        )

    async def _call_with_timeout(
        self, epoch: int, seconds: float, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any
    ) -> T:
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                result = await fn(*args, **kwargs)
        except TimeoutError as exc:
            if not scope.expired():
                self._failed(epoch, exc)  # the callee's own TimeoutError
                raise
            error = CallTimeoutError(self._name, seconds)
            self._failed(epoch, error)
            raise error from exc
        except Exception as exc:
            self._failed(epoch, exc)
            raise
        except BaseException:
            self._released(epoch)
            raise
        self._succeeded(epoch)
        return result


class UnknownBreakerError(KeyError):
    """No breaker of that name is on the board; ``known`` lists the valid names."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"no breaker named {self.name!r}; known breakers: {', '.join(self.known) or '(none)'}"


class BreakerBoard:
    """The application's named breakers (gemini, discord.send, storage, ...) on one clock.

    Keyword arguments are the defaults for ``add``; listeners added to the board hear every
    breaker's transitions, including breakers added later.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        success_threshold: int = 1,
        describe: Callable[[BaseException], str] = describe_error,
    ) -> None:
        self._clock = clock
        self._fail_max = fail_max
        self._reset_timeout = reset_timeout
        self._success_threshold = success_threshold
        self._describe = describe
        self._breakers: dict[str, Breaker] = {}
        self._listeners: list[StateListener] = []

    def add(
        self,
        name: str,
        *,
        fail_max: int | None = None,
        reset_timeout: float | None = None,
        success_threshold: int | None = None,
        exclude: Iterable[Exclusion] = (),
    ) -> Breaker:
        """Create the breaker ``name``; unset settings take the board's defaults."""
        if name in self._breakers:
            raise ValueError(f"breaker {name!r} already exists")
        breaker = Breaker(
            name,
            self._clock,
            fail_max=self._fail_max if fail_max is None else fail_max,
            reset_timeout=self._reset_timeout if reset_timeout is None else reset_timeout,
            success_threshold=self._success_threshold if success_threshold is None else success_threshold,
            exclude=exclude,
            describe=self._describe,
        )
        for callback in self._listeners:
            breaker.add_listener(callback)
        self._breakers[name] = breaker
        return breaker

    def get(self, name: str) -> Breaker:
        """The breaker ``name``; raises ``UnknownBreakerError`` (a ``KeyError``) naming the valid ones."""
        try:
            return self._breakers[name]
        except KeyError:
            raise UnknownBreakerError(name, self.names()) from None

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[Breaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def names(self) -> list[str]:
        """Breaker names in the order they were added."""
        return list(self._breakers)

    def snapshot(self) -> list[BreakerSnapshot]:
        """Every breaker's snapshot, in the order they were added."""
        return [breaker.snapshot() for breaker in self._breakers.values()]

    def reset_all(self) -> None:
        """Close every breaker and clear its counters."""
        for breaker in self._breakers.values():
            breaker.reset()

    def add_listener(self, callback: StateListener) -> None:
        """Call ``callback(name, old_state, new_state)`` on every breaker's transitions."""
        self._listeners.append(callback)
        for breaker in self._breakers.values():
            breaker.add_listener(callback)
