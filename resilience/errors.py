"""Error categories, the runtime's own exceptions, and ``classify(exc)``.

Every failure the bot meets is turned into a ``Classification`` in one place, so that
retry policies, breakers, the queue and the user-facing text all agree on what happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Category(StrEnum):
    """What kind of failure happened, independent of which dependency raised it."""

    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    UNAVAILABLE = "unavailable"
    CONNECTION = "connection"
    CIRCUIT_OPEN = "circuit_open"
    BAD_RESPONSE = "bad_response"
    INVALID_INPUT = "invalid_input"
    TOO_LARGE = "too_large"
    AUTH = "auth"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    SAFETY_BLOCKED = "safety_blocked"
    BUSY = "busy"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one exception.

    ``retryable`` means "transient: the same call may succeed later" (retry now or queue);
    ``retry_after`` is the server's hint in seconds when it gave one; ``daily_quota`` marks a
    quota that resets at the end of the day, not within the minute.
    """

    category: Category
    retryable: bool
    retry_after: float | None
    user_message: str
    code: int | None = None
    daily_quota: bool = False


class ResilienceError(Exception):
    """Root of the runtime's own exceptions."""


class CircuitOpenError(ResilienceError):
    """A breaker rejected the call without running it."""

    def __init__(self, name: str, remaining: float) -> None:
        super().__init__(f"circuit {name!r} is open; next probe in {remaining:.1f}s")
        self.name = name
        self.remaining = remaining


class CallTimeoutError(ResilienceError, TimeoutError):
    """A guarded call took longer than its timeout."""

    def __init__(self, operation: str, timeout: float) -> None:
        super().__init__(f"{operation} timed out after {timeout:.2f}s")
        self.operation = operation
        self.timeout = timeout


class RetryHintTooLongError(ResilienceError):
    """The server asked us to wait longer than the policy's cap: give up now and queue."""

    def __init__(self, retry_after: float, cap: float, original: BaseException) -> None:
        super().__init__(f"server asked to wait {retry_after:.1f}s (cap {cap:.1f}s)")
        self.retry_after = retry_after
        self.cap = cap
        self.original = original


class MutexTimeoutError(ResilienceError, TimeoutError):
    """A keyed mutex was not acquired within its timeout."""

    def __init__(self, key: str, timeout: float) -> None:
        super().__init__(f"lock {key!r} not acquired within {timeout:.2f}s")
        self.key = key
        self.timeout = timeout


class ServiceStartError(ResilienceError):
    """A service failed to start; the services started before it were rolled back."""

    def __init__(self, service: str, cause: BaseException) -> None:
        super().__init__(f"service {service!r} failed to start: {cause!r}")
        self.service = service
        self.cause = cause


class RegistryConfigError(ResilienceError):
    """The service graph is invalid (a cycle, an unknown dependency, a duplicate name)."""
