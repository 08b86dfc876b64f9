"""Retry policies on tenacity, with server hints honoured and a retry budget.

Order of the guards around one dependency call, used everywhere in the runtime::

    RetryPolicy.call        (outermost: decides whether to try again, sleeps between tries)
      -> breaker            (fails fast with CircuitOpenError; counts each try's outcome)
        -> with_timeout     (inside the breaker, so timeouts count as failures)
          -> the SDK call

The policy never retries ``CircuitOpenError``: an open breaker means "stop calling", so the
caller queues the work instead. A server hint longer than ``hint_cap`` ends the call at once
with ``RetryHintTooLongError`` (queue it and come back later). The ``RetryBudget`` caps the
extra traffic retries add during an outage: each call earns a fraction of a retry.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential

from resilience.clock import Clock, SystemClock
from resilience.errors import CircuitOpenError, Classification, RetryHintTooLongError, classify

T = TypeVar("T")

OnRetry = Callable[[int, Classification, float], None]
"""``on_retry(attempt, classification, delay)``: attempt ``attempt`` failed; retrying after ``delay`` s."""


class RetryBudget:
    """A token bucket limiting retries to a fraction of calls, per dependency.

    Every call deposits ``ratio`` tokens; every retry spends one. On top of that, tokens
    accrue at ``min_per_second`` so a quiet dependency can still retry now and then. The
    bucket holds at most ``max_tokens`` and starts full. With the defaults, a dependency in
    a full outage sees at most ~10% extra attempts (plus the initial ``max_tokens``).
    """

    def __init__(
        self,
        ratio: float = 0.1,
        min_per_second: float = 0.1,
        max_tokens: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or max_tokens < 1:
            raise ValueError("need ratio >= 0, min_per_second >= 0 and max_tokens >= 1")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.max_tokens = max_tokens
        self._clock: Clock = clock or SystemClock()
        self._tokens = max_tokens
        self._last_refill = self._clock.monotonic()
        self.calls = 0
        self.retries_spent = 0
        self.retries_denied = 0

    @property
    def tokens(self) -> float:
        """Tokens available now (each pays for one retry)."""
        self._refill()
        return self._tokens

    def deposit(self) -> None:
        """Record one call (not a retry): it earns ``ratio`` of a retry."""
        self.calls += 1
        self._refill()
        self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        """Take one token for a retry; False (and counted as denied) when the bucket is short."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.retries_spent += 1
            return True
        self.retries_denied += 1
        return False

    def _refill(self) -> None:
        """Add the time-based floor for the time elapsed since the last refill."""
        now = self._clock.monotonic()
        elapsed = now - self._last_refill
        self._last_refill = now
        if elapsed > 0 and self.min_per_second > 0:
            self._tokens = min(self.max_tokens, self._tokens + elapsed * self.min_per_second)


class RetryPolicy:
    """Retry a dependency call on transient failures, the way the whole runtime does it.

    - retries only what ``classify(exc).retryable`` says, never ``CircuitOpenError``;
    - waits full-jitter exponential (``uniform(0, min(max_delay, base_delay * 2**(n-1)))``)
      unless the failure carries a server hint (``retry_after``), which is waited exactly;
    - a hint above ``hint_cap`` raises ``RetryHintTooLongError`` at once, without sleeping;
    - after ``max_attempts`` the last original exception is re-raised (never tenacity's
      ``RetryError``);
    - the budget is asked last, only when a retry would otherwise happen; a denied retry
      re-raises the original exception.

    Counters (``calls``, ``attempts``, ``retries``, ``budget_denied``, ``hints_too_long``,
    ``exhausted``) are plain ints for the metrics service to read.
    """

    def __init__(
        self,
        name: str,
        *,
        max_attempts: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        hint_cap: float = 20.0,
        budget: RetryBudget | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        classify: Callable[[BaseException], Classification] = classify,
        rng: random.Random | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.name = name
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.hint_cap = hint_cap
        self.budget = budget
        self._sleep = sleep
        self._classify = classify
        self._rng = rng or random.Random()
        self._on_retry = on_retry
        self._ceiling = wait_exponential(multiplier=base_delay, max=max_delay)
        self.calls = 0
        self.attempts = 0
        self.retries = 0
        self.budget_denied = 0
        self.hints_too_long = 0
        self.exhausted = 0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` (a fresh awaitable per attempt) under this policy and return its result."""
        self.calls += 1
        if self.budget is not None:
            self.budget.deposit()
        # Fast path: a first attempt that succeeds never pays for tenacity's per-call setup
        # (~100 us of inspect checks); tenacity owns the loop from the first failure on.
        self.attempts += 1
        try:
            return await fn()
        except Exception as exc:
            first_failure: Exception = exc
        attempt = _Attempt(self, first_failure)
        if not attempt.should_retry(first_failure):
            # Permanent errors and open breakers fail fast, without building a retry loop.
            raise first_failure
        retrying = AsyncRetrying(
            sleep=self._sleep,
            retry=retry_if_exception(attempt.should_retry),
            wait=attempt.wait,
            stop=_StopHintTooLong(attempt) | stop_after_attempt(self.max_attempts) | _StopBudget(attempt),
            before_sleep=attempt.before_sleep,
            retry_error_callback=attempt.give_up,
        )
        return await retrying(attempt.run, fn)


class _Attempt:
    """The state of one ``RetryPolicy.call``: the last failure's classification and delay."""

    def __init__(self, policy: RetryPolicy, first_failure: Exception) -> None:
        self.policy = policy
        self.replay: Exception | None = first_failure
        self.verdict: Classification | None = None
        self.hint_too_long = False
        self.exhausted = False

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One attempt; tenacity's first one replays the failure of the fast path."""
        if self.replay is not None:
            failure, self.replay = self.replay, None
            raise failure
        self.policy.attempts += 1
        return await fn()

    def should_retry(self, exc: BaseException) -> bool:
        """Transient failures only; cancellation, breaker rejections and bugs end the call."""
        if not isinstance(exc, Exception) or isinstance(exc, CircuitOpenError):
            return False
        self.verdict = self.policy._classify(exc)
        return self.verdict.retryable

    def wait(self, retry_state: RetryCallState) -> float:
        """The server's hint when given, else full jitter over the exponential ceiling."""
        hint = self.verdict.retry_after if self.verdict is not None else None
        if hint is not None:
            return hint
        return self.policy._rng.uniform(0.0, self.policy._ceiling(retry_state))

    def before_sleep(self, retry_state: RetryCallState) -> None:
        """Count and report the retry that is about to happen."""
        self.policy.retries += 1
        if self.policy._on_retry is not None and self.verdict is not None:
            self.policy._on_retry(retry_state.attempt_number, self.verdict, retry_state.upcoming_sleep)

    def give_up(self, retry_state: RetryCallState) -> object:
        """Stop: raise RetryHintTooLongError for a too-long hint, else the original exception."""
        outcome = retry_state.outcome
        assert outcome is not None  # tenacity only stops after an attempt
        original = outcome.exception()
        assert original is not None  # a successful attempt is never retried
        hint = self.verdict.retry_after if self.verdict is not None else None
        if self.hint_too_long and hint is not None:
            raise RetryHintTooLongError(hint, self.policy.hint_cap, original) from original
        if self.exhausted:
            self.policy.exhausted += 1
        raise original


class _StopHintTooLong(stop_base):
    """Stop when the server asked for a wait longer than the policy's cap."""

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def __call__(self, retry_state: RetryCallState) -> bool:
        hint = self.attempt.verdict.retry_after if self.attempt.verdict is not None else None
        if hint is None or hint <= self.attempt.policy.hint_cap:
            # stop_after_attempt runs next; remember whether it is the one that stops us.
            self.attempt.exhausted = retry_state.attempt_number >= self.attempt.policy.max_attempts
            return False
        self.attempt.hint_too_long = True
        self.attempt.policy.hints_too_long += 1
        return True


class _StopBudget(stop_base):
    """Stop when the retry budget has no token left; asked last, so only real retries spend."""

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def __call__(self, retry_state: RetryCallState) -> bool:
        budget = self.attempt.policy.budget
        if budget is None or budget.try_spend():
            return False
        self.attempt.policy.budget_denied += 1
        return True
