"""Degradation mode and the durable queue protocol.

The runtime talks to the queue only through ``DurableQueue``; the SQLite store in
``services/`` implements it, so ``resilience/`` never imports SQLite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import structlog

from resilience.clock import Clock


class Mode(StrEnum):
    NORMAL = "normal"
    DEGRADED = "degraded"
    MAINTENANCE = "maintenance"


class ItemKind(StrEnum):
    INBOUND = "inbound"    # a user message still to be answered
    OUTBOUND = "outbound"  # an answer still to be delivered to Discord


class ItemState(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    DEAD = "dead"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One queued unit of work. ``payload`` is JSON-serialisable."""

    id: int
    kind: ItemKind
    conversation_key: str
    payload: dict[str, Any]
    state: ItemState
    attempts: int
    created_at: float
    next_attempt_at: float
    lease_until: float | None = None
    last_error: str | None = None
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Depth by (kind, state) and the age of the oldest pending item in seconds."""

    depth: dict[tuple[ItemKind, ItemState], int] = field(default_factory=dict)
    oldest_pending_age: float | None = None

    def pending(self, kind: ItemKind | None = None) -> int:
        return sum(
            n for (k, s), n in self.depth.items() if s is ItemState.PENDING and (kind is None or k is kind)
        )


@dataclass(frozen=True, slots=True)
class QueueCaps:
    """Caps on waiting work, checked when new inbound work is accepted (None: no cap).

    ``max_items`` bounds the live items (pending and claimed, both kinds); ``max_pending_per_user``
    and ``max_pending_per_guild`` bound the pending inbound items of one author (payload
    ``author_id``) and of one guild (payload ``guild_id``; DMs have none). A new inbound item
    over a cap raises ``resilience.errors.QueueFullError``. Outbound items (answers and notices
    of work already accepted) are never refused.
    """

    max_items: int | None = None
    max_pending_per_user: int | None = None
    max_pending_per_guild: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_items", "max_pending_per_user", "max_pending_per_guild"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 or None, not {value!r}")


class DurableQueue(Protocol):
    """FIFO per conversation; every state change is one committed transaction.

    Times are wall-clock seconds (``Clock.time()``) passed in by the caller, so the queue is
    testable with a fake clock and survives restarts.
    """

    async def enqueue(
        self,
        kind: ItemKind,
        conversation_key: str,
        payload: dict[str, Any],
        *,
        now: float,
        dedup_key: str | None = None,
        caps: QueueCaps | None = None,
    ) -> QueueItem:
        """Add an item (or return the existing one with the same ``dedup_key``).

        An inbound item over one of ``caps`` raises ``QueueFullError`` and nothing is stored;
        an outbound one is always added.
        """
        ...

    async def claim(
        self, *, now: float, lease_seconds: float, kind: ItemKind | None = None, limit: int = 10
    ) -> list[QueueItem]:
        """Lease due items: at most the head of each conversation, none where one is claimed.

        Claims whose lease ran out (a crashed worker) count as pending again.
        """
        ...

    async def complete(self, item_id: int, *, now: float | None = None) -> None:
        """Mark an item done; ``now`` (default: the queue's clock) starts its retention."""
        ...

    async def fail(self, item_id: int, error: str, *, next_attempt_at: float) -> QueueItem:
        """Return a claimed item to pending with ``attempts + 1``."""
        ...

    async def dead_letter(self, item_id: int, error: str, *, now: float | None = None) -> QueueItem:
        """Give up on an item for good; ``now`` (default: the queue's clock) starts its retention."""
        ...

    async def expire(self, *, now: float, max_age: float) -> list[QueueItem]:
        """Mark pending items older than ``max_age`` expired and return them."""
        ...

    async def position(self, item_id: int) -> int:
        """1-based position among pending inbound+outbound items (0 if not pending)."""
        ...

    async def stats(self, *, now: float) -> QueueStats: ...

    async def purge(self, state: ItemState) -> int:
        """Delete items in a terminal state (done, dead, expired); return how many."""
        ...


log = structlog.get_logger(__name__)

DEFAULT_MAINTENANCE_MESSAGE = (
    "The bot is under maintenance. Your message is saved and will be answered when it is back."
)


@dataclass(frozen=True, slots=True)
class DegradationSnapshot:
    """The mode at one instant. ``since`` is wall-clock seconds (``Clock.time()``)."""

    mode: Mode
    reason: str
    since: float
    message: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": str(self.mode), "reason": self.reason, "since": self.since, "message": self.message}


ModeListener = Callable[[DegradationSnapshot, DegradationSnapshot], None]
"""Called as ``listener(old, new)`` after every change."""


class DegradationState:
    """The bot's operating mode (normal, degraded, maintenance) with its reason and notice.

    ``set()`` changes it and notifies listeners (a raising listener is logged and skipped);
    setting the same mode, reason and message again is a no-op. ``since`` moves only when the
    mode itself changes. In maintenance, ``message`` is the notice users see (a default one
    if none is given).
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._current = DegradationSnapshot(Mode.NORMAL, "", clock.time(), None)
        self._listeners: list[ModeListener] = []

    @property
    def mode(self) -> Mode:
        return self._current.mode

    def snapshot(self) -> DegradationSnapshot:
        """The current mode, reason, since and message."""
        return self._current

    def add_listener(self, listener: ModeListener) -> None:
        """Call ``listener(old, new)`` after every change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ModeListener) -> None:
        """Stop notifying ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def set(self, mode: Mode, reason: str = "", message: str | None = None) -> DegradationSnapshot:
        """Switch to ``mode``; returns the new snapshot."""
        mode = Mode(mode)
        if mode is Mode.MAINTENANCE and message is None:
            message = DEFAULT_MAINTENANCE_MESSAGE
        old = self._current
        if (old.mode, old.reason, old.message) == (mode, reason, message):
            return old
        since = old.since if old.mode is mode else self._clock.time()
        new = self._current = DegradationSnapshot(mode, reason, since, message)
        log.warning("degradation_mode_changed", old=str(old.mode), new=str(mode), reason=reason)
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception as exc:
                log.error("degradation_listener_failed", error=repr(exc), exc_info=exc)
        return new
