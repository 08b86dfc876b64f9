"""Degradation mode and the durable queue protocol.

The runtime talks to the queue only through ``DurableQueue``; the SQLite store in
``services/`` implements it, so ``resilience/`` never imports SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


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
    ) -> QueueItem:
        """Add an item (or return the existing one with the same ``dedup_key``)."""
        ...

    async def claim(
        self, *, now: float, lease_seconds: float, kind: ItemKind | None = None, limit: int = 10
    ) -> list[QueueItem]:
        """Lease due items: at most the head of each conversation, none where one is claimed.

        Claims whose lease ran out (a crashed worker) count as pending again.
        """
        ...

    async def complete(self, item_id: int) -> None: ...

    async def fail(self, item_id: int, error: str, *, next_attempt_at: float) -> QueueItem:
        """Return a claimed item to pending with ``attempts + 1``."""
        ...

    async def dead_letter(self, item_id: int, error: str) -> QueueItem: ...

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
