"""The storage the bot uses, as an interface with two backends.

``Storage`` names every operation the bot (and its tools) call on its store: the durable queue
(``resilience.degradation.DurableQueue`` and the pipeline's acceptance, requeue and finish),
conversation history, processed message ids, housekeeping, token usage, file references,
incidents, availability and alert states, events. Two classes implement it:

- ``services.storage.SqliteStore``: one SQLite file, one process (the default, ``make run``);
- ``services.pg_storage.PostgresStore``: PostgreSQL (``DATABASE_URL``), any number of processes.

Both keep the same promises: every write is one committed transaction, every call runs under the
storage breaker and a timeout (``statement_timeout``), and ``tests/services/test_storage*.py``
run against both.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, Protocol

from resilience.degradation import DurableQueue, ItemKind, ItemState, QueueCaps, QueueItem, QueueStats
from services.storage import (
    AlertRecord,
    AvailabilityDay,
    Event,
    Housekeeping,
    IncidentRecord,
    Reminder,
    Turn,
    TurnInput,
    UsageRecord,
    UsageRow,
    UsageTotals,
)

__all__ = ["Storage"]


class Storage(DurableQueue, Protocol):
    """Every storage operation the bot uses (see the module docstring). A registry service."""

    name: str
    depends_on: tuple[str, ...]
    statement_timeout: float
    history_max_messages: int
    history_max_chars: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def health(self) -> dict[str, Any]: ...
    async def schema_version(self) -> int: ...

    # conversation history
    async def append_turn(
        self, key: str, role: str, text: str, *, message_id: str | int | None = None, now: float | None = None
    ) -> None: ...
    async def append_turns(
        self,
        key: str,
        turns: Sequence[TurnInput],
        *,
        now: float | None = None,
        usage: UsageRecord | None = None,
    ) -> None: ...
    async def history(self, key: str) -> list[Turn]: ...
    async def history_if_next(self, key: str, item_id: int) -> list[Turn] | None: ...
    async def forget(self, key: str, *, branches: bool = False) -> int: ...
    async def branch(self, question_id: str | int, new_key: str) -> str | None: ...
    async def prune_history(self, older_than_seconds: float, *, now: float | None = None) -> int: ...

    # file references of the history
    async def record_attachment_refs(
        self, key: str, message_id: str | int, refs: Sequence[dict[str, Any]], *, keep: int,
        now: float | None = None,
    ) -> None: ...
    async def attachment_refs(
        self, key: str, *, limit: int
    ) -> builtins.list[tuple[int, str, dict[str, Any]]]: ...
    async def update_attachment_ref(self, ref_id: int, ref: dict[str, Any]) -> None: ...
    async def attachment_ref_keys(self) -> set[str]: ...
    async def prune_attachment_refs(self, older_than_seconds: float, *, now: float | None = None) -> int: ...

    # the queue beyond DurableQueue
    async def claim(
        self,
        *,
        now: float,
        lease_seconds: float,
        kind: ItemKind | None = None,
        limit: int = 10,
        fewest_attempts_first: bool = False,
    ) -> builtins.list[QueueItem]: ...
    async def get(self, item_id: int) -> QueueItem | None: ...
    async def accept(
        self,
        message_id: str | int,
        kind: ItemKind,
        conversation_key: str,
        payload: dict[str, Any],
        *,
        now: float,
        lease_seconds: float,
        claim: bool = True,
        caps: QueueCaps | None = None,
    ) -> QueueItem | None: ...
    async def accept_with_history(
        self,
        message_id: str | int,
        kind: ItemKind,
        conversation_key: str,
        payload: dict[str, Any],
        *,
        now: float,
        lease_seconds: float,
        caps: QueueCaps | None = None,
    ) -> tuple[QueueItem, builtins.list[Turn] | None] | None: ...
    async def requeue(
        self,
        item_id: int,
        *,
        error: str,
        next_attempt_at: float,
        count_attempt: bool = True,
        kind: ItemKind | None = None,
        payload: dict[str, Any] | None = None,
    ) -> QueueItem: ...
    async def finish(
        self,
        item_id: int,
        *,
        key: str | None = None,
        turns: Sequence[TurnInput] = (),
        now: float | None = None,
        usage: UsageRecord | None = None,
    ) -> None: ...
    async def update_payload(
        self, item_id: int, payload: dict[str, Any], *, kind: ItemKind | None = None
    ) -> QueueItem: ...
    async def release_claims(self) -> int: ...
    async def list(self, state: ItemState | None = None, limit: int = 50) -> builtins.list[QueueItem]: ...
    async def recent_inbound(self, since: float, limit: int) -> builtins.list[dict[str, Any]]: ...
    async def stats(self, *, now: float) -> QueueStats: ...

    # processed message ids
    async def mark_processed(self, message_id: str | int, *, now: float | None = None) -> bool: ...
    async def is_processed(self, message_id: str | int) -> bool: ...
    async def prune_processed(self, older_than_seconds: float, now: float | None = None) -> int: ...

    # housekeeping
    async def housekeeping(
        self,
        *,
        now: float,
        queue_retention: float,
        history_retention: float,
        processed_retention: float,
        done_retention: float = ...,
        usage_retention: float = ...,
        batch_rows: int = ...,
        max_batches: int = ...,
    ) -> Housekeeping: ...

    # token usage
    async def record_usage(self, usage: UsageRecord) -> None: ...
    async def usage_by_owner(self, day: int) -> tuple[dict[int, int], dict[int, int]]: ...
    async def usage_totals(
        self, first_day: int, last_day: int, *, user_id: int | None = None, guild_id: int | None = None
    ) -> UsageTotals: ...
    async def usage_by_model(
        self, first_day: int, last_day: int, *, user_id: int | None = None, guild_id: int | None = None
    ) -> dict[str, UsageTotals]: ...
    async def usage_top(
        self, first_day: int, last_day: int, *, by: str, limit: int = 10, guild_id: int | None = None
    ) -> builtins.list[UsageRow]: ...

    # events, incidents, availability, alerts
    async def record_event(self, kind: str, data: dict[str, Any], *, now: float | None = None) -> None: ...
    async def recent_events(self, kind: str | None = None, limit: int = 50) -> builtins.list[Event]: ...
    async def save_incident(self, incident: IncidentRecord) -> int: ...
    async def incidents(
        self, *, limit: int = 50, since: float | None = None
    ) -> builtins.list[IncidentRecord]: ...
    async def close_open_incidents(self, *, now: float, note: str) -> int: ...
    async def availability(self, *, now: float, days: int = 7) -> builtins.list[AvailabilityDay]: ...
    async def alert_states(self) -> builtins.list[AlertRecord]: ...
    async def save_alert_states(
        self, states: Sequence[AlertRecord], *, delete: Sequence[str] = ()
    ) -> None: ...

    # reminders (plugins/remind.py)
    async def add_reminder(
        self, *, user_id: int, channel_id: int, guild_id: int | None, source_id: int, text: str,
        due_at: float, now: float | None = None,
    ) -> Reminder: ...
    async def due_reminders(self, *, now: float, limit: int = 50) -> builtins.list[Reminder]: ...
    async def next_reminder_at(self) -> float | None: ...
    async def user_reminders(self, user_id: int) -> builtins.list[Reminder]: ...
    async def cancel_reminder(self, reminder_id: int, user_id: int) -> bool: ...
    async def reminder_fired(self, reminder_id: int, *, now: float | None = None) -> None: ...
