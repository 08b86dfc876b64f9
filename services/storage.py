"""The SQLite store: conversation history, the durable degradation queue, processed ids, events.

One database file in WAL mode, opened through aiosqlite. Durability choice: ``synchronous=FULL``
(the default here) fsyncs the WAL on every commit, so a committed queue change survives a
``kill -9`` *and* a power loss. WAL + ``NORMAL`` would also survive a process crash (the WAL
is in the OS page cache once ``COMMIT`` returns) and is faster; only power loss could lose the
last commits. ``bench/bench_storage.py`` measures both; pass ``synchronous="NORMAL"`` to trade.

Every public write is one transaction, every read one statement, each under
``asyncio.timeout(statement_timeout)`` (raising ``CallTimeoutError``) and, when a breaker is
given, run through ``breaker.call``. Writes start with ``BEGIN IMMEDIATE`` so two processes
never claim the same queue item. The writes of every message's path and of the queue
(acceptance, ``finish``, ``append_turns``, ``enqueue``, ``claim``, ``expire`` and the state
changes) run their whole transaction as one call on aiosqlite's thread (``_in_thread``): one
hop from the event loop instead of one per statement, and the lock is held that much shorter.
A timeout on ``COMMIT`` itself is an ambiguous outcome (the commit may have landed); callers
retry, and ``dedup_key`` / ``mark_processed`` make the retries idempotent.

Growth is bounded: acceptance refuses new inbound work over the caller's ``QueueCaps``
(``QueueFullError``), and ``housekeeping`` deletes finished items, old turns and old processed
ids after their retention, a bounded number of rows per transaction. The file (and so its WAL
and shared memory) is readable by its owner only: it holds the conversations.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import aiosqlite

from resilience.clock import Clock, SystemClock
from resilience.degradation import ItemKind, ItemState, QueueCaps, QueueItem, QueueStats
from resilience.errors import CallTimeoutError, QueueFullError
from services.datadir import make_private_dir

T = TypeVar("T")

ROLES = ("user", "model")
MAX_SPEAKER_CHARS = 120  # a speaker label: a display name (32 characters at most) and a mention
TERMINAL_STATES = (ItemState.DONE, ItemState.DEAD, ItemState.EXPIRED)
TRUNCATION_MARK = " […truncated]"
BUSY_SLICE_MS = 20  # one uninterruptible SQLite busy wait; see SqliteStore._begin
# The database holds conversation history: owner-only. SQLite creates the -wal and -shm files
# with the main file's mode, so creating that one 0600 covers all three.
FILE_MODE = 0o600
SIDECARS = ("-wal", "-shm")
# Rows one housekeeping transaction deletes at most: 5-10 ms of write lock (p50) for dead-lettered
# messages of 4,000 characters (bench/bench_storage.py), so a message arriving meanwhile barely waits.
HOUSEKEEPING_BATCH_ROWS = 200

# Forward-only migrations: entry N (1-based) moves the schema from version N-1 to N.
# Never edit a shipped entry; append a new one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_key TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'model')),
            text TEXT NOT NULL,
            message_id TEXT,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX turns_by_key ON turns (conversation_key, id)",
        """CREATE TABLE queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            conversation_key TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            lease_until REAL,
            last_error TEXT,
            dedup_key TEXT UNIQUE
        )""",
        "CREATE INDEX queue_by_state ON queue (state, conversation_key, id)",
        """CREATE TABLE processed (
            message_id TEXT PRIMARY KEY,
            processed_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX processed_by_time ON processed (processed_at)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX events_by_kind ON events (kind, id)",
    ],
    [
        # Who a queued message is from, for the per-user and per-guild caps (QueueCaps): virtual
        # columns read from the payload, so rows written before this migration have them too and
        # no write path has to fill them. json_valid: one damaged payload must not stop the bot.
        "ALTER TABLE queue ADD COLUMN author_id INTEGER GENERATED ALWAYS AS "
        "(CASE WHEN json_valid(payload) THEN json_extract(payload, '$.author_id') END) VIRTUAL",
        "ALTER TABLE queue ADD COLUMN guild_id INTEGER GENERATED ALWAYS AS "
        "(CASE WHEN json_valid(payload) THEN json_extract(payload, '$.guild_id') END) VIRTUAL",
        # Partial: only pending inbound items are counted against the caps, so only they are indexed.
        "CREATE INDEX queue_pending_by_author ON queue (author_id) "
        "WHERE state = 'pending' AND kind = 'inbound'",
        "CREATE INDEX queue_pending_by_guild ON queue (guild_id) "
        "WHERE state = 'pending' AND kind = 'inbound'",
        # The number of live items (pending or claimed), for the total cap: kept by triggers in the
        # transaction of every change, so acceptance reads one row instead of counting a backlog.
        "CREATE TABLE queue_live (n INTEGER NOT NULL)",
        "INSERT INTO queue_live (n) SELECT COUNT(*) FROM queue WHERE state IN ('pending', 'claimed')",
        """CREATE TRIGGER queue_live_insert AFTER INSERT ON queue
            WHEN NEW.state IN ('pending', 'claimed')
            BEGIN UPDATE queue_live SET n = n + 1; END""",
        """CREATE TRIGGER queue_live_delete AFTER DELETE ON queue
            WHEN OLD.state IN ('pending', 'claimed')
            BEGIN UPDATE queue_live SET n = n - 1; END""",
        """CREATE TRIGGER queue_live_update AFTER UPDATE OF state ON queue
            WHEN (OLD.state IN ('pending', 'claimed')) != (NEW.state IN ('pending', 'claimed'))
            BEGIN UPDATE queue_live SET n = n + CASE WHEN NEW.state IN ('pending', 'claimed')
                THEN 1 ELSE -1 END; END""",
        # Housekeeping (SqliteStore.housekeeping): finished items by when they finished (rows
        # finished before this migration count from their creation), turns by age.
        "ALTER TABLE queue ADD COLUMN finished_at REAL",
        "UPDATE queue SET finished_at = created_at WHERE state IN ('done', 'dead', 'expired')",
        "CREATE INDEX queue_finished ON queue (state, finished_at) "
        "WHERE state IN ('done', 'dead', 'expired')",
        "CREATE INDEX turns_by_time ON turns (created_at)",
    ],
    [
        # Operations (bot.incidents, bot.health, bot.alerts). Incidents: one row per episode of an
        # open breaker or of degraded mode, with what it did to the queue (IncidentRecord).
        """CREATE TABLE incidents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            dependency TEXT NOT NULL,
            cause TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            settled_at REAL,
            queued INTEGER NOT NULL DEFAULT 0,
            answered_after INTEGER NOT NULL DEFAULT 0,
            dead_lettered INTEGER NOT NULL DEFAULT 0,
            note TEXT
        )""",
        "CREATE INDEX incidents_by_dependency ON incidents (dependency, started_at)",
        # Availability per UTC day of acceptance: accepted messages (inbound items inserted), and
        # those finished (done: answered, or told why in place of an answer) at all and within
        # AVAILABILITY_WITHIN seconds. Kept by triggers in the transaction of each change, so no
        # write path fills it and housekeeping (which deletes done items) loses nothing. Notices
        # (an outbound item of its own, payload "notice") are no accepted message.
        """CREATE TABLE availability (
            day INTEGER PRIMARY KEY,
            accepted INTEGER NOT NULL DEFAULT 0,
            answered INTEGER NOT NULL DEFAULT 0,
            answered_in_time INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TRIGGER availability_accepted AFTER INSERT ON queue WHEN NEW.kind = 'inbound'
            BEGIN INSERT INTO availability (day, accepted) VALUES (CAST(NEW.created_at / 86400 AS INTEGER), 1)
                ON CONFLICT (day) DO UPDATE SET accepted = accepted + 1; END""",
        """CREATE TRIGGER availability_answered AFTER UPDATE OF state ON queue
            WHEN NEW.state = 'done' AND OLD.state != 'done'
                AND (CASE WHEN json_valid(NEW.payload) THEN json_extract(NEW.payload, '$.notice') END) IS NULL
            BEGIN INSERT INTO availability (day, answered, answered_in_time)
                VALUES (CAST(NEW.created_at / 86400 AS INTEGER), 1,
                        CASE WHEN NEW.finished_at - NEW.created_at <= 30 THEN 1 ELSE 0 END)
                ON CONFLICT (day) DO UPDATE SET answered = answered + 1,
                    answered_in_time = answered_in_time + excluded.answered_in_time; END""",
        # Alerts that fire (or whose resolution is still to be told), so a restart neither repeats
        # a notification early nor forgets to say an alert is over (bot.alerts).
        """CREATE TABLE alerts (
            key TEXT PRIMARY KEY,
            detail TEXT NOT NULL,
            since REAL NOT NULL,
            notified_at REAL,
            resolved_at REAL
        ) WITHOUT ROWID""",
    ],
    [
        # Files a conversation's turns referred to (bot/attachments.py): a reference (name, type,
        # where to fetch it again, a Gemini file URI while valid), never the bytes; the newest few
        # per conversation are kept, so a later question can still see an earlier image.
        """CREATE TABLE attachment_refs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_key TEXT NOT NULL,
            message_id TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX attachment_refs_by_key ON attachment_refs (conversation_key, id)",
        "CREATE INDEX attachment_refs_by_time ON attachment_refs (created_at)",
    ],
    [
        # Gemini's usage_metadata per UTC day, user, guild (0: a DM) and model (bot/usage.py): one
        # row each, added to in the transaction that finishes the answer (no extra write per message).
        """CREATE TABLE token_usage (
            day INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            guild_id INTEGER NOT NULL,
            model TEXT NOT NULL,
            calls INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            thought_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, user_id, guild_id, model)
        ) WITHOUT ROWID""",
        "CREATE INDEX token_usage_by_guild ON token_usage (day, guild_id)",
    ],
    [
        # Conversations (bot/conversations.py): who said a user turn (a label such as "Bob
        # (<@123>)", so Gemini can tell the people of a channel apart), and the turns by the id of
        # the message they came from, so a reply to an earlier answer finds that answer's
        # conversation and continues it as a branch of its own.
        "ALTER TABLE turns ADD COLUMN speaker TEXT",
        "CREATE INDEX turns_by_message ON turns (message_id, id) WHERE message_id IS NOT NULL",
    ],
    [
        # Reminders (plugins/remind.py): what to tell whom, where and when. A due reminder is handed
        # to the queue as an outbound item (its dedup key names the reminder) and then marked fired.
        """CREATE TABLE reminders (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL,
            channel_id INTEGER NOT NULL,
            guild_id INTEGER,
            source_id INTEGER NOT NULL,
            text TEXT NOT NULL,
            due_at REAL NOT NULL,
            created_at REAL NOT NULL,
            fired_at REAL
        )""",
        "CREATE INDEX reminders_due ON reminders (due_at) WHERE fired_at IS NULL",
        "CREATE INDEX reminders_by_user ON reminders (user_id, due_at) WHERE fired_at IS NULL",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
AVAILABILITY_WITHIN = 30.0
"""Seconds from acceptance within which an answer counts for availability (fixed in migration 3)."""
DAY = 86400.0
INCIDENTS_MAX = 1000  # incident rows kept; older ones are deleted as new ones come

_QUEUE_COLUMNS = (
    "id, kind, conversation_key, payload, state, attempts, created_at, next_attempt_at, "
    "lease_until, last_error, dedup_key"
)


_NEWEST_TURNS_SQL = (
    "SELECT role, text, created_at, message_id, speaker FROM turns WHERE conversation_key = ? "
    "ORDER BY id DESC LIMIT ?"
)

# Acceptance's insert: claimed (with a lease) when asked and the conversation has nothing
# pending, else pending; the last column says whether no older item is pending or claimed.
_ACCEPT_SQL = f"""INSERT INTO queue (kind, conversation_key, payload, state, attempts, created_at,
        next_attempt_at, lease_until, dedup_key)
    SELECT :kind, :key, :payload, CASE WHEN b.wait THEN 'pending' ELSE 'claimed' END, 0, :now,
        :now, CASE WHEN b.wait THEN NULL ELSE :lease_until END, :dedup
    FROM (SELECT NOT :claim OR EXISTS (SELECT 1 FROM queue WHERE conversation_key = :key
        AND state = 'pending') AS wait) AS b
    RETURNING {_QUEUE_COLUMNS}, NOT EXISTS (SELECT 1 FROM queue AS o WHERE o.conversation_key = :key
        AND o.state IN ('pending', 'claimed') AND o.id < queue.id)"""


# Counts for the caps. The per-owner counts stop at the cap and repeat the partial indexes' WHERE
# terms, so SQLite uses those indexes; the live items are counted by triggers (queue_live).
_LIVE_ITEMS_SQL = "SELECT n FROM queue_live"
_PENDING_BY_AUTHOR_SQL = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM queue WHERE state = 'pending' AND kind = 'inbound' "
    "AND author_id = :owner LIMIT :cap)"
)
_PENDING_BY_GUILD_SQL = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM queue WHERE state = 'pending' AND kind = 'inbound' "
    "AND guild_id = :owner LIMIT :cap)"
)


# Housekeeping's deletions, each of at most :limit rows, each through an index. The state terms
# repeat the partial index's WHERE (queue_finished) so that SQLite uses it.
_PRUNE_FINISHED_SQL = (
    "DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE state IN ('done', 'dead', 'expired') "
    "AND state = :state AND finished_at < :cutoff LIMIT :limit)"
)
_PRUNE_TURNS_SQL = (
    "DELETE FROM turns WHERE id IN (SELECT id FROM turns WHERE created_at < :cutoff LIMIT :limit)"
)
_PRUNE_PROCESSED_SQL = (
    "DELETE FROM processed WHERE message_id IN "
    "(SELECT message_id FROM processed WHERE processed_at < :cutoff LIMIT :limit)"
)
_PRUNE_USAGE_SQL = (
    "DELETE FROM token_usage WHERE (day, user_id, guild_id, model) IN (SELECT day, user_id, guild_id, "
    "model FROM token_usage WHERE day < :cutoff_day LIMIT :limit)"
)

# One Gemini call's tokens added to its (day, user, guild, model) row.
_ADD_USAGE_SQL = """INSERT INTO token_usage (day, user_id, guild_id, model, calls, prompt_tokens,
        output_tokens, thought_tokens, cached_tokens) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)
    ON CONFLICT (day, user_id, guild_id, model) DO UPDATE SET calls = calls + 1,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        thought_tokens = thought_tokens + excluded.thought_tokens,
        cached_tokens = cached_tokens + excluded.cached_tokens"""
# What counts against a quota: tokens Gemini read (cached ones included) and wrote (thoughts too).
COUNTED_SQL = "prompt_tokens + output_tokens + thought_tokens"
USAGE_RETENTION_SECONDS = 400 * 86400.0
"""How long daily usage rows are kept (a year and a bit: a month-on-month comparison still works)."""
SECONDS_PER_DAY = 86400


class StorageError(Exception):
    """Root of the store's own errors."""


MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
"""A versioned migration file: ``0001_what_it_does.sql``."""


def migration_files(directory: Path) -> list[tuple[int, Path]]:
    """The versioned SQL files of ``directory``, in order; their numbers must run 1, 2, 3, ...
    without a gap (``StorageError`` otherwise). For the PostgreSQL schema and the memory store."""
    found = sorted(
        (int(m.group(1)), path) for path in directory.iterdir() if (m := MIGRATION_NAME.match(path.name))
    )
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise StorageError(f"migrations in {directory} are not numbered 1..N without gaps: {numbers}")
    return found


class SchemaTooNewError(StorageError):
    """The database was written by a newer version of the bot; refuse to touch it."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            f"{path} has schema version {found}, this build supports up to {supported}; "
            "upgrade the bot or restore an older database"
        )
        self.path = path
        self.found = found
        self.supported = supported


class QueueItemNotFoundError(StorageError, LookupError):
    """No queue item with this id (purged, or never existed)."""

    def __init__(self, item_id: int) -> None:
        super().__init__(f"queue item {item_id} not found")
        self.item_id = item_id


class StorageBusyError(StorageError, TimeoutError):
    """Another connection held the write lock for longer than ``busy_timeout_ms``.

    A ``TimeoutError``, so ``classify`` calls it a transient TIMEOUT (not a bug): the lock goes.
    """

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        super().__init__(f"{path} stayed locked by another writer for {busy_timeout_ms} ms")
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms


class StoreNotStartedError(StorageError):
    """An operation was called before ``start()`` or after ``stop()``."""


class Breaker(Protocol):
    """The part of a circuit breaker the store uses (resilience/breakers.py provides one)."""

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> T: ...


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored message of a conversation; ``speaker`` says who wrote a user turn (None: unknown,
    or a model turn)."""

    role: str
    text: str
    created_at: float
    message_id: str | None = None
    speaker: str | None = None


TurnInput = tuple[str, str, str | int | None] | tuple[str, str, str | int | None, str | None]
"""A turn to store: ``(role, text, message_id)``, or with its ``speaker`` as a fourth item."""


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded error or trace event for status views."""

    id: int
    kind: str
    data: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True)
class Reminder:
    """A reminder (plugins/remind.py): tell ``user_id`` ``text`` in ``channel_id`` at ``due_at``.

    ``source_id`` is the id of the interaction that set it: unique, it names the delivery (its
    marks and nonce) so a restarted bot recognises a reminder it already posted.
    """

    id: int
    user_id: int
    channel_id: int
    guild_id: int | None
    source_id: int
    text: str
    due_at: float
    created_at: float
    fired_at: float | None = None


REMINDER_COLUMNS = "id, user_id, channel_id, guild_id, source_id, text, due_at, created_at, fired_at"
REMINDERS_PER_USER = 25
"""At most this many pending reminders per user (``add_reminder`` refuses more)."""


class TooManyRemindersError(Exception):
    """A user already has ``REMINDERS_PER_USER`` pending reminders."""


def reminder_from_row(row: Sequence[Any]) -> Reminder:
    return Reminder(
        id=int(row[0]), user_id=int(row[1]), channel_id=int(row[2]),
        guild_id=None if row[3] is None else int(row[3]), source_id=int(row[4]), text=str(row[5]),
        due_at=float(row[6]), created_at=float(row[7]), fired_at=None if row[8] is None else float(row[8]),
    )


def usage_day(timestamp: float) -> int:
    """The UTC day (days since the epoch) a wall-clock ``timestamp`` falls in: the quota's window."""
    return int(timestamp // SECONDS_PER_DAY)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One Gemini call's ``usage_metadata``, charged to a user (and guild; None in a DM) on a UTC day.

    ``prompt`` counts every input token (``cached`` of them came from Gemini's cache), ``output``
    the answer's (candidates) tokens and ``thought`` a thinking model's reasoning tokens.
    """

    day: int
    user_id: int
    guild_id: int | None
    model: str
    prompt: int = 0
    output: int = 0
    thought: int = 0
    cached: int = 0

    @property
    def counted(self) -> int:
        """What counts against a quota: read and written tokens (thoughts included)."""
        return self.prompt + self.output + self.thought

    def row(self) -> tuple[int, int, int, str, int, int, int, int]:
        return (
            self.day, self.user_id, self.guild_id or 0, self.model,
            self.prompt, self.output, self.thought, self.cached,
        )


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Summed usage (of a user, a guild, a model, or the bot) over some days."""

    calls: int = 0
    prompt: int = 0
    output: int = 0
    thought: int = 0
    cached: int = 0

    @property
    def counted(self) -> int:
        """Tokens that count against a quota (``UsageRecord.counted``)."""
        return self.prompt + self.output + self.thought


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One user's or guild's (``owner_id``; 0 is DMs) usage in a report."""

    owner_id: int
    totals: UsageTotals


def totals_from_row(row: Sequence[Any] | None) -> UsageTotals:
    if row is None or row[0] is None:
        return UsageTotals()
    return UsageTotals(*(int(v or 0) for v in row[:5]))


SUM_USAGE_SQL = "SUM(calls), SUM(prompt_tokens), SUM(output_tokens), SUM(thought_tokens), SUM(cached_tokens)"


@dataclass(frozen=True, slots=True)
class IncidentRecord:
    """One episode of an open breaker (``kind`` "breaker", ``dependency`` its name) or of degraded
    mode (``kind`` "degraded"). Times are wall-clock seconds; ``ended_at`` is None while it lasts,
    ``settled_at`` None until the queue it left was worked off. ``queued``: messages queued during
    it; ``answered_after``: queued messages answered from its start until it settled;
    ``dead_lettered``: items given up on in that time. ``id`` is None until stored."""

    kind: str
    dependency: str
    cause: str
    started_at: float
    ended_at: float | None = None
    settled_at: float | None = None
    queued: int = 0
    answered_after: int = 0
    dead_lettered: int = 0
    note: str | None = None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class AvailabilityDay:
    """One UTC day (``day``: days since the epoch) of accepted messages: ``settled`` are those whose
    verdict is known (answered, or not answered within the limit by now)."""

    day: int
    accepted: int
    answered: int
    answered_in_time: int
    settled: int


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert's stored state: firing since ``since``, last told at ``notified_at``; with
    ``resolved_at`` it is over but its resolution is still to be told."""

    key: str
    detail: str
    since: float
    notified_at: float | None
    resolved_at: float | None


@dataclass(frozen=True, slots=True)
class Housekeeping:
    """What one ``housekeeping`` call deleted. ``more``: it stopped at its bound (its last
    transaction was full), so rows may still be due; call it again soon, not at the next slot."""

    done_items: int = 0
    dead_items: int = 0
    expired_items: int = 0
    turns: int = 0
    processed_ids: int = 0
    usage_rows: int = 0
    more: bool = False

    @property
    def total(self) -> int:
        return (
            self.done_items + self.dead_items + self.expired_items + self.turns + self.processed_ids
            + self.usage_rows
        )

    def as_dict(self) -> dict[str, int]:
        """The counts by name (for a log line)."""
        return {
            "done_items": self.done_items,
            "dead_items": self.dead_items,
            "expired_items": self.expired_items,
            "turns": self.turns,
            "processed_ids": self.processed_ids,
            "usage_rows": self.usage_rows,
        }


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    if limit <= len(TRUNCATION_MARK):
        return text[:limit]
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def item_from_row(row: Sequence[Any]) -> QueueItem:
    """A ``QueueItem`` from a row of ``_QUEUE_COLUMNS`` (any backend's row: a sequence of them)."""
    return QueueItem(
        id=row[0],
        kind=ItemKind(row[1]),
        conversation_key=row[2],
        payload=json.loads(row[3]),
        state=ItemState(row[4]),
        attempts=row[5],
        created_at=row[6],
        next_attempt_at=row[7],
        lease_until=row[8],
        last_error=row[9],
        dedup_key=row[10],
    )


async def _one(db: aiosqlite.Connection, sql: str, args: Any = ()) -> sqlite3.Row | None:
    """The first row of a statement, in one hop to aiosqlite's thread (not three)."""
    rows = await db.execute_fetchall(sql, args)
    return next(iter(rows), None)


async def _all(db: aiosqlite.Connection, sql: str, args: Any = ()) -> builtins.list[sqlite3.Row]:
    """All rows of a statement, in one hop to aiosqlite's thread."""
    return builtins.list(await db.execute_fetchall(sql, args))


def turn_rows(
    key: str, turns: Sequence[TurnInput], stamp: float, max_chars: int
) -> list[tuple[str, str, str, str | None, float, str | None]]:
    """``(key, role, text, message_id, created_at, speaker)`` rows of ``turns``: roles checked,
    texts cut to ``max_chars``, speakers to ``MAX_SPEAKER_CHARS``. Shared by both backends."""
    rows = []
    for turn in turns:
        role, text, mid = turn[0], turn[1], turn[2]
        speaker = turn[3] if len(turn) > 3 else None
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        rows.append((
            key, role, truncate(text, max_chars), None if mid is None else str(mid), stamp,
            None if speaker is None else str(speaker)[:MAX_SPEAKER_CHARS],
        ))
    return rows


def bounded_history(newest_first: list[Turn], max_chars: int) -> list[Turn]:
    """The newest turns that fit ``max_chars`` together, oldest first (the newest one cut to fit
    when it alone is too long). Shared by both backends."""
    kept: list[Turn] = []
    budget = max_chars
    for turn in newest_first:
        if len(turn.text) > budget:
            if not kept:  # the newest turn alone is too long (bound lowered since it was stored)
                cut = truncate(turn.text, budget)
                kept.append(Turn(turn.role, cut, turn.created_at, turn.message_id, turn.speaker))
            break
        kept.append(turn)
        budget -= len(turn.text)
    kept.reverse()
    return kept


def check_housekeeping(batch_rows: int, max_batches: int, **retentions: float) -> None:
    """Refuse negative retentions and empty batches (``housekeeping``'s arguments, both backends)."""
    for name, value in retentions.items():
        if not value >= 0:
            raise ValueError(f"{name} must be at least 0 seconds, not {value!r}")
    if batch_rows < 1 or max_batches < 1:
        raise ValueError("batch_rows and max_batches must be at least 1")


# The last_error of an item whose claim ended without its holder recording how: the holder died
# (its claims are released at start-up) or outlived its lease. It may have posted the answer, so
# only such an item needs a look at the channel before it is answered (claim_abandoned).
CLAIM_RELEASED = "claim released at start-up"
LEASE_RAN_OUT = "lease ran out"


def claim_abandoned(item: QueueItem) -> bool:
    """Whether ``item``'s last claim ended with no outcome recorded (its answer may be out already).

    False for an item never claimed and for one its holder put back (``requeue``, ``fail``).
    """
    return item.last_error in (CLAIM_RELEASED, LEASE_RAN_OUT)


def _refusal(conn: sqlite3.Connection, caps: QueueCaps, payload: dict[str, Any]) -> QueueFullError | None:
    """The cap a new inbound item with ``payload`` would break, most specific first; None if none.

    Run inside the accepting write transaction (BEGIN IMMEDIATE): no other writer, in this process
    or another, can add an item between this count and the insert.
    """
    checks = (
        ("user", caps.max_pending_per_user, payload.get("author_id"), _PENDING_BY_AUTHOR_SQL),
        ("guild", caps.max_pending_per_guild, payload.get("guild_id"), _PENDING_BY_GUILD_SQL),
        ("queue", caps.max_items, None, _LIVE_ITEMS_SQL),
    )
    for scope, cap, owner, sql in checks:
        if cap is None or (scope != "queue" and owner is None):
            continue
        (count,) = conn.execute(sql, {"owner": owner, "cap": cap}).fetchone()
        if count >= cap:
            return QueueFullError(scope, cap, owner)
    return None


def _reap_leases(conn: sqlite3.Connection, now: float) -> None:
    """Return claims whose lease ran out (their worker crashed) to pending."""
    conn.execute(
        "UPDATE queue SET state = 'pending', lease_until = NULL, last_error = ? "
        "WHERE state = 'claimed' AND lease_until <= ?",
        (LEASE_RAN_OUT, now),
    )


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Not a database / malformed image / our quick_check verdict, as opposed to locked or I/O."""
    if isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None)
    return name is None or name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


Body = Callable[[aiosqlite.Connection], Awaitable[T]]
SyncBody = Callable[[sqlite3.Connection], T]


class _Abandoned(StorageError):
    """Internal: the caller gave up (timeout, cancel) before COMMIT; the thread rolls back instead."""


class SqliteStore:
    """History, durable queue, processed ids and events in one SQLite file.

    A registry service (``name``, ``depends_on``, ``start``, ``stop``, ``health``) and an
    implementation of ``resilience.degradation.DurableQueue``. Times are wall-clock seconds
    passed in by the caller (``now``); where ``now`` is optional it defaults to ``clock.time()``.
    """

    name = "storage"
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        path: Path,
        *,
        statement_timeout: float = 5.0,
        busy_timeout_ms: int = 5000,
        history_max_messages: int = 20,
        history_max_chars: int = 12000,
        events_max: int = 500,
        synchronous: str = "FULL",
        quarantine_corrupt: bool = True,
        clock: Clock | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.statement_timeout = statement_timeout
        self.busy_timeout_ms = busy_timeout_ms
        self.history_max_messages = history_max_messages
        self.history_max_chars = history_max_chars
        self.events_max = events_max
        self.synchronous = synchronous.upper()
        self._clock: Clock = clock or SystemClock()
        self._breaker = breaker
        self.quarantine_corrupt = quarantine_corrupt
        self.quarantined: Path | None = None
        self._db: aiosqlite.Connection | None = None
        # One connection runs one transaction at a time; the lock keeps coroutines from interleaving.
        self._lock = asyncio.Lock()
        self._last_error: str | None = None
        self._consecutive_failures = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, set WAL and the pragmas, and run pending migrations.

        A corrupt file (not a database, or failing ``quick_check``) is moved aside to
        ``<name>.corrupt-<stamp>`` with its WAL and a fresh database is started, unless
        ``quarantine_corrupt`` is False; ``health()`` then reports ``alert`` and the path.
        """
        if self._db is not None:
            return
        make_private_dir(self.path.parent)
        try:
            await self._open()
        except sqlite3.DatabaseError as exc:
            if not self.quarantine_corrupt or not _is_corruption(exc):
                raise
            self.quarantined = self._quarantine()
            await self._open()
            await self.record_event(
                "storage.quarantined", {"path": str(self.quarantined), "error": repr(exc)}
            )

    def _secure_files(self) -> None:
        """Create the database file owner-only, or make an existing one (and its WAL) owner-only.

        An empty file is an empty database to SQLite. Files of another owner are left as they are.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            for name in (str(self.path), *(f"{self.path}{suffix}" for suffix in SIDECARS)):
                try:
                    info = os.stat(name)
                except FileNotFoundError:
                    continue
                if info.st_mode & 0o077 and info.st_uid == os.geteuid():
                    os.chmod(name, FILE_MODE)
        else:
            os.close(fd)

    async def _open(self) -> None:
        self._secure_files()
        slice_ms = min(BUSY_SLICE_MS, self.busy_timeout_ms)
        db = await aiosqlite.connect(self.path, isolation_level=None, timeout=slice_ms / 1000)
        try:
            row = await _one(db, "PRAGMA journal_mode = WAL")
            if row is None or str(row[0]).lower() != "wal":
                raise StorageError(f"could not switch {self.path} to WAL (got {row!r})")
            await db.execute(f"PRAGMA synchronous = {self.synchronous}")
            check = await _all(db, "PRAGMA quick_check")
            if [tuple(r) for r in check] != [("ok",)]:
                raise sqlite3.DatabaseError(f"quick_check failed: {[r[0] for r in check][:5]}")
            await self._migrate(db)
            self._db = db
        except BaseException:
            await db.close()
            raise

    def _quarantine(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock.time()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", *SIDECARS):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.replace(Path(f"{target}{suffix}"))
        return target

    async def stop(self) -> None:
        """Close the connection; safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                try:
                    # Fold the WAL back into the main file so a stopped store is one small file.
                    await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass  # another connection is reading; the next checkpoint will do it
                await db.close()

    def health(self) -> dict[str, Any]:
        """Open, and the last operation did not fail."""
        return {
            "ok": self._db is not None and self._consecutive_failures == 0,
            "open": self._db is not None,
            "alert": self.quarantined is not None,
            "quarantined": None if self.quarantined is None else str(self.quarantined),
            "path": str(self.path),
            "schema_version": SCHEMA_VERSION,
            "consecutive_failures": self._consecutive_failures,
            "last_error": self._last_error,
        }

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = await _one(db, "SELECT MAX(version) FROM schema_version")
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise SchemaTooNewError(self.path, current, SCHEMA_VERSION)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        """The version recorded in the database."""

        async def body(db: aiosqlite.Connection) -> int:
            row = await _one(db, "SELECT MAX(version) FROM schema_version")
            return int(row[0]) if row and row[0] is not None else 0

        return await self._run("schema_version", body, write=False)

    # -- the transaction runner ------------------------------------------------------------

    async def _run(self, operation: str, body: Body[T], *, write: bool = True) -> T:
        if self._breaker is not None:
            return await self._breaker.call(self._transaction, operation, body, write)
        return await self._transaction(operation, body, write)

    async def _transaction(self, operation: str, body: Body[T], write: bool) -> T:
        db = self._db
        if db is None:
            raise StoreNotStartedError(f"storage.{operation} called while the store is closed")
        try:
            async with asyncio.timeout(self.statement_timeout):
                async with self._lock:
                    result = await self._in_transaction(db, body, write)
        except (sqlite3.Error, StorageBusyError) as exc:  # before TimeoutError: busy is one too
            self._failed(f"{operation}: {exc!r}")
            raise
        except TimeoutError as exc:
            self._failed(f"{operation}: timed out after {self.statement_timeout}s")
            raise CallTimeoutError(f"storage.{operation}", self.statement_timeout) from exc
        self._consecutive_failures = 0
        return result

    async def _in_transaction(self, db: aiosqlite.Connection, body: Body[T], write: bool) -> T:
        try:
            # BEGIN inside the try: a timeout while it waits for another writer must still roll back.
            # Reads are single statements in autocommit: consistent on their own, two hops cheaper.
            if write:
                await self._begin(db, "BEGIN IMMEDIATE")
            result = await body(db)
            if write:
                await db.execute("COMMIT")
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                # A timeout or a cancel: stop the statement still running in aiosqlite's thread so
                # the rollback, queued behind it, runs now rather than when the statement ends.
                await db.interrupt()
            try:
                await asyncio.shield(self._rollback(db))
            except asyncio.CancelledError:
                pass  # the rollback is queued on the connection's thread and still runs in order
            raise
        return result

    async def _begin(self, db: aiosqlite.Connection, statement: str) -> None:
        # SQLite's busy wait cannot be interrupted, so wait in short slices (the connection's busy
        # timeout is BUSY_SLICE_MS) and loop here, where a timeout or a cancel can stop us.
        # Real time, not the injected clock: this measures SQLite's own real waiting.
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                await db.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise StorageBusyError(self.path, self.busy_timeout_ms) from exc

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        for _ in range(3):  # an interrupt may still be pending and abort the first attempt
            try:
                await db.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass  # "no transaction is active" (BEGIN never ran, or COMMIT landed) or "interrupted"
            if not db.in_transaction:
                return

    def _in_thread(self, body: SyncBody[T]) -> Body[T]:
        """A transaction body that runs BEGIN IMMEDIATE, ``body`` and COMMIT in one call on the
        connection's thread: one hop from the event loop instead of one per statement.

        Pass it to ``_run`` with ``write=False`` (it begins and commits itself). aiosqlite has no
        public way to run a function on its thread; ``_execute`` is what its own methods use
        (the version is pinned below 0.23). A cancelled caller sets ``stop``: the thread then
        stops waiting for the write lock and rolls back instead of committing; ``_in_transaction``
        still interrupts a running statement and queues its rollback behind the call.
        """

        async def run(db: aiosqlite.Connection) -> T:
            stop = threading.Event()
            try:
                # aiosqlite private API (see above): run one function on the connection thread.
                result: T = await db._execute(self._thread_transaction, db, body, stop)
            except asyncio.CancelledError:
                stop.set()
                raise
            return result

        return run

    def _thread_transaction(self, db: aiosqlite.Connection, body: SyncBody[T], stop: threading.Event) -> T:
        """On the connection's thread: the whole write transaction; rolled back on any failure."""
        conn = db._conn  # aiosqlite private API: the sqlite3 connection, used only on its thread
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:  # the busy wait in slices, like _begin, so a cancelled caller stops it
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if stop.is_set():
                    raise _Abandoned("the caller gave up while waiting for the write lock") from exc
                if time.monotonic() >= deadline:
                    raise StorageBusyError(self.path, self.busy_timeout_ms) from exc
        try:
            result = body(conn)
            if stop.is_set():
                raise _Abandoned("the caller gave up before COMMIT")
            conn.execute("COMMIT")
        except BaseException:
            for _ in range(3):  # an interrupt may still be pending and abort the first attempt
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.OperationalError:
                    pass
                if not conn.in_transaction:
                    break
            raise
        return result

    def _failed(self, message: str) -> None:
        self._last_error = message
        self._consecutive_failures += 1

    def _now(self, now: float | None) -> float:
        return self._clock.time() if now is None else now

    # -- conversation history --------------------------------------------------------------

    async def append_turn(
        self, key: str, role: str, text: str, *, message_id: str | int | None = None, now: float | None = None
    ) -> None:
        """Store one turn and prune the conversation to its newest ``history_max_messages`` rows."""
        await self.append_turns(key, [(role, text, message_id)], now=now)

    async def append_turns(
        self,
        key: str,
        turns: Sequence[TurnInput],
        *,
        now: float | None = None,
        usage: UsageRecord | None = None,
    ) -> None:
        """Store ``(role, text, message_id[, speaker])`` turns in one transaction (a question and its
        answer), and ``usage`` (the Gemini call that answered it) in the same one."""
        rows = self._turn_rows(key, turns, now)

        def body(conn: sqlite3.Connection) -> None:
            if rows:
                self._insert_turns(conn, key, rows)
            if usage is not None:
                conn.execute(_ADD_USAGE_SQL, usage.row())

        await self._run("append_turns", self._in_thread(body), write=False)

    def _turn_rows(
        self, key: str, turns: Sequence[TurnInput], now: float | None
    ) -> list[tuple[str, str, str, str | None, float, str | None]]:
        """Validated, truncated rows for ``_insert_turns``."""
        return turn_rows(key, turns, self._now(now), self.history_max_chars)

    def _insert_turns(
        self,
        conn: sqlite3.Connection,
        key: str,
        rows: list[tuple[str, str, str, str | None, float, str | None]],
    ) -> None:
        """Insert turns and prune the conversation to its newest ``history_max_messages`` rows."""
        conn.executemany(
            "INSERT INTO turns (conversation_key, role, text, message_id, created_at, speaker) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute(
            "DELETE FROM turns WHERE conversation_key = ? AND id NOT IN "
            "(SELECT id FROM turns WHERE conversation_key = ? ORDER BY id DESC LIMIT ?)",
            (key, key, self.history_max_messages),
        )

    async def history(self, key: str) -> list[Turn]:
        """The newest turns, oldest first, within both the message and the character bound."""

        async def body(db: aiosqlite.Connection) -> list[Turn]:
            return await self._newest_turns(db, key)

        return self._bounded(await self._run("history", body, write=False))

    async def history_if_next(self, key: str, item_id: int) -> list[Turn] | None:
        """The history for answering ``item_id``, or None when an older item of the conversation
        is still queued or being worked on (it must be answered first). One round trip."""

        async def body(db: aiosqlite.Connection) -> list[Turn] | None:
            older = await _one(
                db,
                "SELECT 1 FROM queue WHERE conversation_key = ? AND state IN ('pending', 'claimed') "
                "AND id < ? LIMIT 1",
                (key, item_id),
            )
            return None if older is not None else await self._newest_turns(db, key)

        newest_first = await self._run("history_if_next", body, write=False)
        return None if newest_first is None else self._bounded(newest_first)

    async def _newest_turns(self, db: aiosqlite.Connection, key: str) -> list[Turn]:
        rows = await _all(db, _NEWEST_TURNS_SQL, (key, self.history_max_messages))
        return [Turn(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def _bounded(self, newest_first: list[Turn]) -> list[Turn]:
        return bounded_history(newest_first, self.history_max_chars)

    async def forget(self, key: str, *, branches: bool = False) -> int:
        """Delete a conversation's history (``/reset``), its file references included; return how
        many turns went. With ``branches``, also the conversations branched off it (keys
        ``"<key>:<id>"``, ``branch``)."""
        where = "conversation_key = ?"
        args: tuple[str, ...] = (key,)
        if branches:
            # A range on the key (":" + 1 is ";"), so the deletion goes through the key's index.
            where = "(conversation_key = ? OR (conversation_key >= ? AND conversation_key < ?))"
            args = (key, f"{key}:", f"{key};")

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute(f"DELETE FROM turns WHERE {where}", args)
            await db.execute(f"DELETE FROM attachment_refs WHERE {where}", args)
            return cur.rowcount

        return await self._run("forget", body)

    async def branch(self, question_id: str | int, new_key: str) -> str | None:
        """The conversation a reply to the answer of question ``question_id`` continues.

        The answer's own conversation (where the question was first stored) when that exchange is
        still its latest; otherwise ``new_key``, a branch that starts as that conversation did up to
        and including the exchange (its turns copied, at most ``history_max_messages``). None when
        no stored conversation holds the question (forgotten, pruned, never stored). Idempotent: a
        replayed message finds ``new_key`` already started and does not copy again. One transaction.
        """
        qid = str(question_id)
        limit = self.history_max_messages

        def body(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT conversation_key, id FROM turns WHERE message_id = ? AND role = 'user' "
                "ORDER BY id LIMIT 1",
                (qid,),
            ).fetchone()
            if row is None:
                return None
            key, asked = str(row[0]), int(row[1])
            latest = conn.execute(
                "SELECT MAX(id) FROM turns WHERE conversation_key = ? AND role = 'user'", (key,)
            ).fetchone()
            if latest is not None and latest[0] == asked:
                return key
            if conn.execute("SELECT 1 FROM turns WHERE conversation_key = ? LIMIT 1", (new_key,)).fetchone():
                return new_key
            answered = conn.execute(
                "SELECT MIN(id) FROM turns WHERE conversation_key = ? AND role = 'model' AND id > ?",
                (key, asked),
            ).fetchone()
            end = answered[0] if answered is not None and answered[0] is not None else asked
            conn.execute(
                "INSERT INTO turns (conversation_key, role, text, message_id, created_at, speaker) "
                "SELECT ?, role, text, message_id, created_at, speaker FROM (SELECT * FROM turns "
                "WHERE conversation_key = ? AND id <= ? ORDER BY id DESC LIMIT ?) ORDER BY id",
                (new_key, key, end, limit),
            )
            return new_key

        return await self._run("branch", self._in_thread(body), write=False)

    # -- file references of the history (bot/attachments.py) --------------------------------

    async def record_attachment_refs(
        self,
        key: str,
        message_id: str | int,
        refs: Sequence[dict[str, Any]],
        *,
        keep: int,
        now: float | None = None,
    ) -> None:
        """Store the file references of one message of conversation ``key`` and keep only the
        conversation's newest ``keep``, in one transaction."""
        stamp = self._now(now)
        rows = [(key, str(message_id), json.dumps(ref, separators=(",", ":")), stamp) for ref in refs]

        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO attachment_refs (conversation_key, message_id, data, created_at) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            conn.execute(
                "DELETE FROM attachment_refs WHERE conversation_key = ? AND id NOT IN "
                "(SELECT id FROM attachment_refs WHERE conversation_key = ? ORDER BY id DESC LIMIT ?)",
                (key, key, keep),
            )

        await self._run("record_attachment_refs", self._in_thread(body), write=False)

    async def attachment_refs(
        self, key: str, *, limit: int
    ) -> builtins.list[tuple[int, str, dict[str, Any]]]:
        """The newest ``limit`` file references of conversation ``key``, oldest first:
        ``(ref id, message id, reference)``."""

        async def body(db: aiosqlite.Connection) -> list[tuple[int, str, dict[str, Any]]]:
            rows = await _all(
                db,
                "SELECT id, message_id, data FROM attachment_refs WHERE conversation_key = ? "
                "ORDER BY id DESC LIMIT ?",
                (key, limit),
            )
            found = []
            for row in reversed(rows):
                try:
                    found.append((int(row[0]), str(row[1]), json.loads(row[2])))
                except ValueError:
                    continue  # one damaged row must not cost the conversation its answer
            return found

        return await self._run("attachment_refs", body, write=False)

    async def update_attachment_ref(self, ref_id: int, ref: dict[str, Any]) -> None:
        """Replace one file reference (a new Gemini file URI after an upload)."""

        async def body(db: aiosqlite.Connection) -> None:
            data = json.dumps(ref, separators=(",", ":"))
            await db.execute("UPDATE attachment_refs SET data = ? WHERE id = ?", (data, ref_id))

        await self._run("update_attachment_ref", body)

    async def attachment_ref_keys(self) -> set[str]:
        """The conversations that have file references (so others skip the read)."""

        async def body(db: aiosqlite.Connection) -> set[str]:
            rows = await _all(db, "SELECT DISTINCT conversation_key FROM attachment_refs")
            return {str(row[0]) for row in rows}

        return await self._run("attachment_ref_keys", body, write=False)

    async def prune_attachment_refs(self, older_than_seconds: float, *, now: float | None = None) -> int:
        """Delete file references older than the history's retention, at most
        ``HOUSEKEEPING_BATCH_ROWS``; return how many went."""
        cutoff = self._now(now) - older_than_seconds

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "DELETE FROM attachment_refs WHERE id IN (SELECT id FROM attachment_refs "
                "WHERE created_at < ? LIMIT ?)",
                (cutoff, HOUSEKEEPING_BATCH_ROWS),
            )
            return cur.rowcount

        return await self._run("prune_attachment_refs", body)

    async def prune_history(self, older_than_seconds: float, *, now: float | None = None) -> int:
        """Delete turns older than the given age (idle conversations); return how many."""
        cutoff = self._now(now) - older_than_seconds

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute("DELETE FROM turns WHERE created_at < ?", (cutoff,))
            return cur.rowcount

        return await self._run("prune_history", body)

    # -- the durable queue (resilience.degradation.DurableQueue) ---------------------------

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
        """Add an item, or return the existing one with the same ``dedup_key``.

        A new inbound item over one of ``caps`` raises ``QueueFullError`` and stores nothing (an
        existing item with its ``dedup_key`` is still returned). Outbound items ignore ``caps``:
        they carry work that was already accepted.
        """
        kind = ItemKind(kind)
        encoded = json.dumps(payload, separators=(",", ":"))
        check = caps if kind is ItemKind.INBOUND else None

        def body(conn: sqlite3.Connection) -> QueueItem | QueueFullError:
            if dedup_key is not None:  # looked up first (inside BEGIN IMMEDIATE) so a replay burns no id
                sql = f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE dedup_key = ?"
                existing = conn.execute(sql, (dedup_key,)).fetchone()
                if existing is not None:
                    return item_from_row(existing)
            if check is not None:
                refused = _refusal(conn, check, payload)
                if refused is not None:
                    return refused  # returned, not raised: a refusal is no failure of the store
            row = conn.execute(
                "INSERT INTO queue (kind, conversation_key, payload, state, attempts, created_at, "
                "next_attempt_at, dedup_key) VALUES (?, ?, ?, 'pending', 0, ?, ?, ?) "
                f"RETURNING {_QUEUE_COLUMNS}",
                (kind.value, conversation_key, encoded, now, now, dedup_key),
            ).fetchone()
            assert row is not None
            return item_from_row(row)

        item = await self._run("enqueue", self._in_thread(body), write=False)
        if isinstance(item, QueueFullError):  # raised outside the breaker: the store is fine
            raise item
        return item

    async def claim(
        self,
        *,
        now: float,
        lease_seconds: float,
        kind: ItemKind | None = None,
        limit: int = 10,
        fewest_attempts_first: bool = False,
    ) -> list[QueueItem]:
        """Lease due items: at most the head of each conversation, none where one is claimed.

        The head is taken across both kinds, so with ``kind`` given a conversation whose head is
        of the other kind yields nothing (an answer is delivered before the next message is
        answered). Oldest first, or with ``fewest_attempts_first`` the heads that failed least
        (a breaker's probe: an item that keeps failing must not be the only one ever tried).
        Claims whose lease ran out (a crashed worker) return to pending first, marked
        ``LEASE_RAN_OUT`` (``claim_abandoned``).
        """
        lease_until = now + lease_seconds
        kind_filter = "" if kind is None else "AND q.kind = :kind"
        order = "q.attempts, q.id" if fewest_attempts_first else "q.id"

        def body(conn: sqlite3.Connection) -> list[QueueItem]:
            _reap_leases(conn, now)
            heads = conn.execute(
                f"""SELECT q.id FROM queue q
                JOIN (SELECT conversation_key, MIN(id) AS head FROM queue
                      WHERE state IN ('pending', 'claimed') GROUP BY conversation_key) h ON q.id = h.head
                WHERE q.state = 'pending' AND q.next_attempt_at <= :now {kind_filter}
                ORDER BY {order} LIMIT :limit""",
                {"now": now, "kind": None if kind is None else ItemKind(kind).value, "limit": limit},
            ).fetchall()
            if not heads:
                return []
            marks = ",".join("?" * len(heads))
            rows = conn.execute(
                f"UPDATE queue SET state = 'claimed', lease_until = ? WHERE id IN ({marks}) "
                f"RETURNING {_QUEUE_COLUMNS}",
                (lease_until, *(r[0] for r in heads)),
            ).fetchall()
            return sorted((item_from_row(r) for r in rows), key=lambda item: item.id)

        return await self._run("claim", self._in_thread(body), write=False)

    async def complete(self, item_id: int, *, now: float | None = None) -> None:
        """Mark an item done (at ``now``, which starts its retention)."""
        await self._set_state(
            "complete", item_id, "state = 'done', lease_until = NULL, finished_at = ?", (self._now(now),)
        )

    async def fail(self, item_id: int, error: str, *, next_attempt_at: float) -> QueueItem:
        """Return a claimed item to pending with ``attempts + 1`` and its next attempt time."""
        return await self._set_state(
            "fail",
            item_id,
            "state = 'pending', attempts = attempts + 1, lease_until = NULL, last_error = ?, "
            "next_attempt_at = ?",
            (error, next_attempt_at),
        )

    async def dead_letter(self, item_id: int, error: str, *, now: float | None = None) -> QueueItem:
        """Give up on an item for good (at ``now``, which starts its retention)."""
        return await self._set_state(
            "dead_letter",
            item_id,
            "state = 'dead', lease_until = NULL, last_error = ?, finished_at = ?",
            (error, self._now(now)),
        )

    async def expire(self, *, now: float, max_age: float) -> list[QueueItem]:
        """Mark pending items (and crashed claims) older than ``max_age`` expired and return them."""
        cutoff = now - max_age

        def body(conn: sqlite3.Connection) -> list[QueueItem]:
            _reap_leases(conn, now)
            rows = conn.execute(
                f"UPDATE queue SET state = 'expired', finished_at = ? WHERE state = 'pending' "
                f"AND created_at < ? RETURNING {_QUEUE_COLUMNS}",
                (now, cutoff),
            ).fetchall()
            return sorted((item_from_row(r) for r in rows), key=lambda item: item.id)

        return await self._run("expire", self._in_thread(body), write=False)

    async def position(self, item_id: int) -> int:
        """1-based position among pending inbound+outbound items (0 if not pending)."""

        async def body(db: aiosqlite.Connection) -> int:
            row = await _one(
                db,
                "SELECT CASE WHEN (SELECT state FROM queue WHERE id = :id) = 'pending' "
                "THEN (SELECT COUNT(*) FROM queue WHERE state = 'pending' AND id <= :id) ELSE 0 END",
                {"id": item_id},
            )
            return int(row[0]) if row else 0

        return await self._run("position", body, write=False)

    async def stats(self, *, now: float) -> QueueStats:
        """Depth by (kind, state) and the age of the oldest pending item."""

        async def body(db: aiosqlite.Connection) -> QueueStats:
            # One statement, so depth and age come from the same snapshot without a transaction.
            rows = await _all(
                db,
                "SELECT kind, state, COUNT(*), MIN(created_at) FROM queue GROUP BY kind, state",
            )
            depth = {(ItemKind(k), ItemState(s)): n for k, s, n, _ in rows}
            pending = [first for _, s, _, first in rows if s == ItemState.PENDING.value]
            oldest = max(0.0, now - min(pending)) if pending else None
            return QueueStats(depth=depth, oldest_pending_age=oldest)

        return await self._run("stats", body, write=False)

    async def purge(self, state: ItemState) -> int:
        """Delete items in a terminal state (done, dead, expired); return how many."""
        state = ItemState(state)
        if state not in TERMINAL_STATES:
            raise ValueError(f"only terminal states can be purged, not {state.value!r}")

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute("DELETE FROM queue WHERE state = ?", (state.value,))
            return cur.rowcount

        return await self._run("purge", body)

    async def get(self, item_id: int) -> QueueItem | None:
        """One item by id, or None."""

        async def body(db: aiosqlite.Connection) -> QueueItem | None:
            try:
                return await self._get(db, item_id)
            except QueueItemNotFoundError:
                return None

        return await self._run("get", body, write=False)

    # -- the pipeline's operations: acceptance and requeueing, each one transaction ---------

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
    ) -> QueueItem | None:
        """Accept a message durably: mark its id processed and store its work item, atomically.

        Returns None when the id was already processed (a replay). The item is claimed by the
        caller (with a lease, so a crash hands it to the drain) when ``claim`` and the
        conversation has nothing pending; otherwise it waits, pending, behind its conversation.

        An inbound message over one of ``caps`` (its author's or guild's pending messages, or
        all live items) raises ``QueueFullError``: nothing is stored and its id is not marked
        processed. The count and the insert are one transaction, so concurrent acceptances, in
        this process or another, cannot both slip under a cap. A replay is never refused.
        """
        accepted = await self._accept(
            message_id, kind, conversation_key, payload,
            now=now, lease_seconds=lease_seconds, claim=claim, with_history=False, caps=caps,
        )
        return None if accepted is None else accepted[0]

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
    ) -> tuple[QueueItem, list[Turn] | None] | None:
        """``accept(claim=True)`` that also reads the history for answering, in the same transaction.

        Raises ``QueueFullError`` over one of ``caps``, like ``accept``.

        Returns None for a replay, else ``(item, history)``. ``history`` is what
        ``history_if_next`` would return right after acceptance: the conversation's history
        when the item is next in it (claimed, no older item pending or claimed), else None
        (ask ``history_if_next`` again under the conversation's mutex). One transaction
        instead of two saves the answer path a round trip to the database thread.
        """
        return await self._accept(
            message_id, kind, conversation_key, payload,
            now=now, lease_seconds=lease_seconds, claim=True, with_history=True, caps=caps,
        )

    async def _accept(
        self,
        message_id: str | int,
        kind: ItemKind,
        conversation_key: str,
        payload: dict[str, Any],
        *,
        now: float,
        lease_seconds: float,
        claim: bool,
        with_history: bool,
        caps: QueueCaps | None,
    ) -> tuple[QueueItem, list[Turn] | None] | None:
        kind = ItemKind(kind)
        check = caps if kind is ItemKind.INBOUND else None
        args = {
            "kind": kind.value,
            "key": conversation_key,
            "payload": json.dumps(payload, separators=(",", ":")),
            "now": now,
            "lease_until": now + lease_seconds,
            "claim": claim,
            "dedup": f"msg:{message_id}",
        }

        def body(conn: sqlite3.Connection) -> tuple[QueueItem, list[Turn] | None] | QueueFullError | None:
            # The replay check comes before the caps (a replay is ignored, never refused), and a
            # refusal leaves nothing behind: the id is marked processed only with its item.
            seen = conn.execute("SELECT 1 FROM processed WHERE message_id = ?", (str(message_id),))
            if seen.fetchone() is not None:
                return None
            if check is not None:
                refused = _refusal(conn, check, payload)
                if refused is not None:
                    return refused  # returned, not raised: a refusal is no failure of the store
            conn.execute(
                "INSERT INTO processed (message_id, processed_at) VALUES (?, ?)", (str(message_id), now)
            )
            # One statement decides the state (claimed unless the conversation has a backlog),
            # inserts, and says whether the item is next (no older item pending or claimed).
            row = conn.execute(_ACCEPT_SQL, args).fetchone()
            item = item_from_row(row)
            if not with_history or item.state is not ItemState.CLAIMED or not row[-1]:
                return item, None
            turns = conn.execute(_NEWEST_TURNS_SQL, (conversation_key, self.history_max_messages))
            return item, [Turn(r[0], r[1], r[2], r[3], r[4]) for r in turns.fetchall()]

        accepted = await self._run("accept", self._in_thread(body), write=False)
        if isinstance(accepted, QueueFullError):  # raised outside the breaker: the store is fine
            raise accepted
        if accepted is None or accepted[1] is None:
            return accepted
        return accepted[0], self._bounded(accepted[1])

    async def requeue(
        self,
        item_id: int,
        *,
        error: str,
        next_attempt_at: float,
        count_attempt: bool = True,
        kind: ItemKind | None = None,
        payload: dict[str, Any] | None = None,
    ) -> QueueItem:
        """Return a claimed item to pending, optionally as another kind with a new payload.

        It keeps its id, so it keeps its place at the head of its conversation. ``count_attempt``
        is False when the item was not really tried (an open breaker, a busy conversation).
        """
        sets = ["state = 'pending'", "lease_until = NULL", "last_error = ?", "next_attempt_at = ?"]
        args: list[Any] = [error, next_attempt_at]
        if count_attempt:
            sets.append("attempts = attempts + 1")
        if kind is not None:
            sets.append("kind = ?")
            args.append(ItemKind(kind).value)
        if payload is not None:
            sets.append("payload = ?")
            args.append(json.dumps(payload, separators=(",", ":")))
        return await self._set_state("requeue", item_id, ", ".join(sets), tuple(args))

    async def finish(
        self,
        item_id: int,
        *,
        key: str | None = None,
        turns: Sequence[TurnInput] = (),
        now: float | None = None,
        usage: UsageRecord | None = None,
    ) -> None:
        """Mark an item done and store the exchange it produced (and the tokens its Gemini call
        used, ``usage``), in one transaction."""
        if turns and key is None:
            raise ValueError("turns need the conversation key")
        rows = self._turn_rows(key or "", turns, now)
        stamp = self._now(now)

        def body(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE queue SET state = 'done', lease_until = NULL, finished_at = ? WHERE id = ?",
                (stamp, item_id),
            )
            if cur.rowcount != 1:
                raise QueueItemNotFoundError(item_id)
            if rows:
                self._insert_turns(conn, key or "", rows)
            if usage is not None:
                conn.execute(_ADD_USAGE_SQL, usage.row())

        await self._run("finish", self._in_thread(body), write=False)

    async def update_payload(
        self, item_id: int, payload: dict[str, Any], *, kind: ItemKind | None = None
    ) -> QueueItem:
        """Replace an item's payload (and kind), keeping its state and lease.

        The pipeline records that a user was told the item is queued, and stages a long answer
        as an outbound item before sending it, so a crash between its chunks resumes delivery.
        """
        sets, args = ["payload = ?"], [json.dumps(payload, separators=(",", ":"))]
        if kind is not None:
            sets.append("kind = ?")
            args.append(ItemKind(kind).value)
        return await self._set_state("update_payload", item_id, ", ".join(sets), tuple(args))

    async def release_claims(self) -> int:
        """Return every claimed item to pending: at start-up, all claims belong to a dead process.

        Each is marked ``CLAIM_RELEASED``: that process may have answered it (``claim_abandoned``).
        """

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "UPDATE queue SET state = 'pending', lease_until = NULL, last_error = ? "
                "WHERE state = 'claimed'",
                (CLAIM_RELEASED,),
            )
            return cur.rowcount

        return await self._run("release_claims", body)

    async def _set_state(
        self, operation: str, item_id: int, assignments: str, args: tuple[Any, ...]
    ) -> QueueItem:
        def body(conn: sqlite3.Connection) -> sqlite3.Row | None:
            sql = f"UPDATE queue SET {assignments} WHERE id = ? RETURNING {_QUEUE_COLUMNS}"
            row: sqlite3.Row | None = conn.execute(sql, (*args, item_id)).fetchone()
            return row

        row = await self._run(operation, self._in_thread(body), write=False)
        if row is None:  # raised outside the breaker: an unknown id is not a storage failure
            raise QueueItemNotFoundError(item_id)
        return item_from_row(row)

    @staticmethod
    async def _get(db: aiosqlite.Connection, item_id: int) -> QueueItem:
        row = await _one(db, f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE id = ?", (item_id,))
        if row is None:
            raise QueueItemNotFoundError(item_id)
        return item_from_row(row)

    # -- processed message ids -------------------------------------------------------------

    async def mark_processed(self, message_id: str | int, *, now: float | None = None) -> bool:
        """Record a message as answered; True if newly marked, False if it already was."""
        stamp = self._now(now)

        async def body(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(
                "INSERT OR IGNORE INTO processed (message_id, processed_at) VALUES (?, ?)",
                (str(message_id), stamp),
            )
            return cur.rowcount == 1

        return await self._run("mark_processed", body)

    async def is_processed(self, message_id: str | int) -> bool:
        """Whether a message was already answered."""

        async def body(db: aiosqlite.Connection) -> bool:
            row = await _one(db, "SELECT 1 FROM processed WHERE message_id = ?", (str(message_id),))
            return row is not None

        return await self._run("is_processed", body, write=False)

    async def prune_processed(self, older_than_seconds: float, now: float | None = None) -> int:
        """Forget processed ids older than the given age; return how many."""
        cutoff = self._now(now) - older_than_seconds

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute("DELETE FROM processed WHERE processed_at < ?", (cutoff,))
            return cur.rowcount

        return await self._run("prune_processed", body)

    # -- housekeeping ----------------------------------------------------------------------

    async def housekeeping(
        self,
        *,
        now: float,
        queue_retention: float,
        history_retention: float,
        processed_retention: float,
        done_retention: float = 0.0,
        usage_retention: float = USAGE_RETENTION_SECONDS,
        batch_rows: int = HOUSEKEEPING_BATCH_ROWS,
        max_batches: int = 50,
    ) -> Housekeeping:
        """Delete what is past its retention, in short transactions; return what went.

        Dead and expired items go ``queue_retention`` seconds after they ended (kept that long
        for operators), done items after ``done_retention`` (default 0: at the next call; they
        hold the user's message and nobody needs them once answered), conversation turns
        ``history_retention`` seconds after they were said, processed message ids (the replay
        guard) after ``processed_retention``, daily token usage after ``usage_retention``. Live
        items (pending, claimed) are never touched.

        Each transaction deletes at most ``batch_rows`` rows, through indexes, so the write lock
        is held only briefly and other writers go between transactions; a call runs at most
        ``max_batches`` of them, and says ``more`` when it stopped there with its last one full.
        """
        check_housekeeping(
            batch_rows,
            max_batches,
            queue_retention=queue_retention,
            history_retention=history_retention,
            processed_retention=processed_retention,
            done_retention=done_retention,
            usage_retention=usage_retention,
        )
        targets = (  # (name, statement, arguments without the limit)
            ("done_items", _PRUNE_FINISHED_SQL, {"state": "done", "cutoff": now - done_retention}),
            ("dead_items", _PRUNE_FINISHED_SQL, {"state": "dead", "cutoff": now - queue_retention}),
            ("expired_items", _PRUNE_FINISHED_SQL, {"state": "expired", "cutoff": now - queue_retention}),
            ("turns", _PRUNE_TURNS_SQL, {"cutoff": now - history_retention}),
            ("processed_ids", _PRUNE_PROCESSED_SQL, {"cutoff": now - processed_retention}),
            ("usage_rows", _PRUNE_USAGE_SQL, {"cutoff_day": usage_day(now - usage_retention)}),
        )

        def batch(conn: sqlite3.Connection) -> dict[str, int]:
            deleted: dict[str, int] = {}
            room = batch_rows
            for name, sql, args in targets:
                deleted[name] = conn.execute(sql, {**args, "limit": room}).rowcount
                room -= deleted[name]
                if room == 0:
                    break
            return deleted

        totals = dict.fromkeys((name for name, _, _ in targets), 0)
        more = True
        for _ in range(max_batches):
            deleted = await self._run("housekeeping", self._in_thread(batch), write=False)
            for name, count in deleted.items():
                totals[name] += count
            if sum(deleted.values()) < batch_rows:
                more = False
                break
        return Housekeeping(
            done_items=totals["done_items"],
            dead_items=totals["dead_items"],
            expired_items=totals["expired_items"],
            turns=totals["turns"],
            processed_ids=totals["processed_ids"],
            usage_rows=totals["usage_rows"],
            more=more,
        )

    # -- token usage (bot/usage.py) ----------------------------------------------------------

    async def record_usage(self, usage: UsageRecord) -> None:
        """Add one Gemini call's tokens on its own, where no transaction finishes the item (a
        delivery Discord refuses for good); the answer path folds it into ``finish``."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(_ADD_USAGE_SQL, usage.row())

        await self._run("record_usage", self._in_thread(body), write=False)

    async def usage_by_owner(self, day: int) -> tuple[dict[int, int], dict[int, int]]:
        """Tokens counted against quotas on UTC ``day``: ``({user_id: n}, {guild_id: n})`` (guild 0:
        DMs). One read, for the quota ledger's start of day."""

        async def body(db: aiosqlite.Connection) -> tuple[dict[int, int], dict[int, int]]:
            by_user, by_guild = (
                f"SELECT {column}, SUM({COUNTED_SQL}) FROM token_usage WHERE day = ? GROUP BY {column}"
                for column in ("user_id", "guild_id")
            )
            users = await _all(db, by_user, (day,))
            guilds = await _all(db, by_guild, (day,))
            return {int(u): int(n) for u, n in users}, {int(g): int(n) for g, n in guilds}

        return await self._run("usage_by_owner", body, write=False)

    async def usage_totals(
        self, first_day: int, last_day: int, *, user_id: int | None = None, guild_id: int | None = None
    ) -> UsageTotals:
        """Usage from ``first_day`` to ``last_day`` (UTC days, inclusive): of one user, one guild
        (0: DMs), both, or the whole bot."""
        where, args = self._usage_filter(first_day, last_day, user_id, guild_id)

        async def body(db: aiosqlite.Connection) -> UsageTotals:
            row = await _one(db, f"SELECT {SUM_USAGE_SQL} FROM token_usage WHERE {where}", args)
            return totals_from_row(row)

        return await self._run("usage_totals", body, write=False)

    async def usage_by_model(
        self, first_day: int, last_day: int, *, user_id: int | None = None, guild_id: int | None = None
    ) -> dict[str, UsageTotals]:
        """``usage_totals`` per model, most tokens first."""
        where, args = self._usage_filter(first_day, last_day, user_id, guild_id)

        async def body(db: aiosqlite.Connection) -> dict[str, UsageTotals]:
            rows = await _all(
                db,
                f"SELECT {SUM_USAGE_SQL}, model FROM token_usage WHERE {where} GROUP BY model "
                f"ORDER BY SUM({COUNTED_SQL}) DESC, model",
                args,
            )
            return {str(r[5]): totals_from_row(r) for r in rows}

        return await self._run("usage_by_model", body, write=False)

    async def usage_top(
        self,
        first_day: int,
        last_day: int,
        *,
        by: str,
        limit: int = 10,
        guild_id: int | None = None,
    ) -> builtins.list[UsageRow]:
        """The ``limit`` users (``by="user"``, optionally within one guild) or guilds (``by="guild"``)
        that used the most tokens from ``first_day`` to ``last_day``."""
        if by not in ("user", "guild"):
            raise ValueError(f"by must be 'user' or 'guild', not {by!r}")
        column = f"{by}_id"
        where, args = self._usage_filter(first_day, last_day, None, guild_id)

        async def body(db: aiosqlite.Connection) -> list[UsageRow]:
            rows = await _all(
                db,
                f"SELECT {SUM_USAGE_SQL}, {column} FROM token_usage WHERE {where} GROUP BY {column} "
                f"ORDER BY SUM({COUNTED_SQL}) DESC, {column} LIMIT ?",
                (*args, limit),
            )
            return [UsageRow(int(r[5]), totals_from_row(r)) for r in rows]

        return await self._run("usage_top", body, write=False)

    @staticmethod
    def _usage_filter(
        first_day: int, last_day: int, user_id: int | None, guild_id: int | None
    ) -> tuple[str, tuple[int, ...]]:
        terms, args = ["day BETWEEN ? AND ?"], [first_day, last_day]
        if user_id is not None:
            terms.append("user_id = ?")
            args.append(user_id)
        if guild_id is not None:
            terms.append("guild_id = ?")
            args.append(guild_id)
        return " AND ".join(terms), tuple(args)

    # -- events ----------------------------------------------------------------------------

    async def record_event(self, kind: str, data: dict[str, Any], *, now: float | None = None) -> None:
        """Append an event and keep only the newest ``events_max``."""
        stamp = self._now(now)
        encoded = json.dumps(data, separators=(",", ":"), default=str)

        async def body(db: aiosqlite.Connection) -> None:
            cur = await db.execute(
                "INSERT INTO events (kind, data, created_at) VALUES (?, ?, ?)", (kind, encoded, stamp)
            )
            assert cur.lastrowid is not None
            await db.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - self.events_max,))

        await self._run("record_event", body)

    async def recent_events(self, kind: str | None = None, limit: int = 50) -> list[Event]:
        """The newest events first, optionally of one kind."""

        async def body(db: aiosqlite.Connection) -> list[Event]:
            if kind is None:
                sql, args = "SELECT id, kind, data, created_at FROM events ORDER BY id DESC LIMIT ?", (limit,)
            else:
                sql = "SELECT id, kind, data, created_at FROM events WHERE kind = ? ORDER BY id DESC LIMIT ?"
                args = (kind, limit)  # type: ignore[assignment]
            return [Event(r[0], r[1], json.loads(r[2]), r[3]) for r in await _all(db, sql, args)]

        return await self._run("recent_events", body, write=False)

    # -- incidents, availability, alerts (bot.incidents, bot.health, bot.alerts) --------

    async def save_incident(self, incident: IncidentRecord) -> int:
        """Insert ``incident`` (``id`` None) or update the row ``incident.id``; return its id.

        Only the newest ``INCIDENTS_MAX`` rows are kept.
        """
        fields = (
            incident.kind, incident.dependency, incident.cause, incident.started_at, incident.ended_at,
            incident.settled_at, incident.queued, incident.answered_after, incident.dead_lettered,
            incident.note,
        )

        def body(conn: sqlite3.Connection) -> int:
            if incident.id is None:
                cur = conn.execute(
                    "INSERT INTO incidents (kind, dependency, cause, started_at, ended_at, settled_at, "
                    "queued, answered_after, dead_lettered, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    fields,
                )
                new_id = cur.lastrowid
                assert new_id is not None
                conn.execute("DELETE FROM incidents WHERE id <= ?", (new_id - INCIDENTS_MAX,))
                return int(new_id)
            conn.execute(
                "UPDATE incidents SET kind = ?, dependency = ?, cause = ?, started_at = ?, ended_at = ?, "
                "settled_at = ?, queued = ?, answered_after = ?, dead_lettered = ?, note = ? WHERE id = ?",
                (*fields, incident.id),
            )
            return incident.id

        return await self._run("save_incident", self._in_thread(body), write=False)

    async def incidents(
        self, *, limit: int = 50, since: float | None = None
    ) -> builtins.list[IncidentRecord]:
        """Incidents newest first, at most ``limit``, optionally only those started at or after ``since``."""
        sql = (
            "SELECT kind, dependency, cause, started_at, ended_at, settled_at, queued, answered_after, "
            "dead_lettered, note, id FROM incidents WHERE started_at >= ? ORDER BY started_at DESC, id DESC "
            "LIMIT ?"
        )

        async def body(db: aiosqlite.Connection) -> list[IncidentRecord]:
            rows = await _all(db, sql, (-math.inf if since is None else since, limit))
            return [IncidentRecord(*row) for row in rows]

        return await self._run("incidents", body, write=False)

    async def close_open_incidents(self, *, now: float, note: str) -> int:
        """End (and settle) every incident still open: its process died. Return how many."""

        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "UPDATE incidents SET ended_at = COALESCE(ended_at, ?), settled_at = ?, "
                "note = COALESCE(note, ?) WHERE settled_at IS NULL",
                (now, now, note),
            )
            return cur.rowcount

        return await self._run("close_open_incidents", body)

    async def availability(self, *, now: float, days: int = 7) -> builtins.list[AvailabilityDay]:
        """The last ``days`` UTC days (today last) with messages accepted, from the triggers' counts.

        A message accepted less than ``AVAILABILITY_WITHIN`` seconds ago and not finished yet is not
        settled: it may still be answered in time. One accepted earlier and still waiting is a miss.
        """
        today = int(now // DAY)
        first = today - days + 1
        young = now - AVAILABILITY_WITHIN

        async def body(db: aiosqlite.Connection) -> list[AvailabilityDay]:
            rows = await _all(
                db,
                "SELECT day, accepted, answered, answered_in_time FROM availability WHERE day >= ? "
                "ORDER BY day",
                (first,),
            )
            pending = await _all(
                db,
                "SELECT CAST(created_at / 86400 AS INTEGER) AS d, COUNT(*) FROM queue "
                "WHERE state IN ('pending', 'claimed') AND created_at > ? AND (CASE WHEN json_valid(payload) "
                "THEN json_extract(payload, '$.notice') END) IS NULL GROUP BY d",
                (young,),
            )
            unsettled = {int(r[0]): int(r[1]) for r in pending}
            return [
                AvailabilityDay(int(r[0]), int(r[1]), int(r[2]), int(r[3]),
                                max(0, int(r[1]) - unsettled.get(int(r[0]), 0)))
                for r in rows
            ]

        return await self._run("availability", body, write=False)

    async def alert_states(self) -> builtins.list[AlertRecord]:
        """Every stored alert state (firing, or resolved and not yet told)."""

        async def body(db: aiosqlite.Connection) -> list[AlertRecord]:
            sql = "SELECT key, detail, since, notified_at, resolved_at FROM alerts ORDER BY key"
            rows = await _all(db, sql)
            return [AlertRecord(*row) for row in rows]

        return await self._run("alert_states", body, write=False)

    async def save_alert_states(
        self, states: Sequence[AlertRecord], *, delete: Sequence[str] = ()
    ) -> None:
        """Write ``states`` (replacing rows of the same key) and delete the keys in ``delete``, in one
        transaction."""
        rows = [(a.key, a.detail, a.since, a.notified_at, a.resolved_at) for a in states]

        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR REPLACE INTO alerts (key, detail, since, notified_at, resolved_at) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            conn.executemany("DELETE FROM alerts WHERE key = ?", [(k,) for k in delete])

        await self._run("save_alert_states", self._in_thread(body), write=False)

    # -- operators (last: the method name shadows the builtin in the class body) --------

    async def recent_inbound(self, since: float, limit: int) -> builtins.list[dict[str, Any]]:
        """The payloads of user messages accepted since ``since`` (any state), newest first: where
        a restarted shard looks for what its predecessor may have missed (bot.catchup)."""

        async def body(db: aiosqlite.Connection) -> builtins.list[dict[str, Any]]:
            sql = (
                "SELECT payload FROM queue WHERE kind = 'inbound' AND created_at >= ? "
                "ORDER BY id DESC LIMIT ?"
            )
            return [json.loads(r[0]) for r in await _all(db, sql, (since, limit))]

        return await self._run("recent_inbound", body, write=False)

    async def list(self, state: ItemState | None = None, limit: int = 50) -> builtins.list[QueueItem]:
        """Items oldest first, optionally of one state (for operators)."""

        async def body(db: aiosqlite.Connection) -> list[QueueItem]:
            if state is None:
                sql, args = f"SELECT {_QUEUE_COLUMNS} FROM queue ORDER BY id LIMIT ?", (limit,)
            else:
                sql = f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE state = ? ORDER BY id LIMIT ?"
                args = (ItemState(state).value, limit)  # type: ignore[assignment]
            return [item_from_row(r) for r in await _all(db, sql, args)]

        return await self._run("list", body, write=False)

    # -- reminders (plugins/remind.py) -------------------------------------------------------

    async def add_reminder(
        self, *, user_id: int, channel_id: int, guild_id: int | None, source_id: int, text: str,
        due_at: float, now: float | None = None,
    ) -> Reminder:
        """Store a reminder; ``TooManyRemindersError`` past ``REMINDERS_PER_USER`` pending ones."""
        stamp = self._now(now)

        # The refusal is returned, not raised, from the transaction: the breaker counts no failure.
        async def body(db: aiosqlite.Connection) -> Reminder | TooManyRemindersError:
            row = await _one(
                db, "SELECT COUNT(*) FROM reminders WHERE user_id = ? AND fired_at IS NULL", (user_id,)
            )
            if row is not None and row[0] >= REMINDERS_PER_USER:
                return TooManyRemindersError(user_id)
            cur = await db.execute(
                "INSERT INTO reminders (user_id, channel_id, guild_id, source_id, text, due_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (user_id, channel_id, guild_id, source_id, text, due_at, stamp),
            )
            assert cur.lastrowid is not None
            return Reminder(cur.lastrowid, user_id, channel_id, guild_id, source_id, text, due_at, stamp)

        added = await self._run("add_reminder", body)
        if isinstance(added, TooManyRemindersError):
            raise added
        return added

    async def due_reminders(self, *, now: float, limit: int = 50) -> builtins.list[Reminder]:
        """Reminders not yet fired whose time has come, the earliest first."""

        async def body(db: aiosqlite.Connection) -> builtins.list[Reminder]:
            sql = (
                f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE fired_at IS NULL AND due_at <= ?"
                " ORDER BY due_at, id LIMIT ?"
            )
            return [reminder_from_row(r) for r in await _all(db, sql, (now, limit))]

        return await self._run("due_reminders", body, write=False)

    async def next_reminder_at(self) -> float | None:
        """When the earliest reminder not yet fired is due (None: none)."""

        async def body(db: aiosqlite.Connection) -> float | None:
            row = await _one(db, "SELECT MIN(due_at) FROM reminders WHERE fired_at IS NULL")
            return None if row is None or row[0] is None else float(row[0])

        return await self._run("next_reminder_at", body, write=False)

    async def user_reminders(self, user_id: int) -> builtins.list[Reminder]:
        """A user's reminders not yet fired, the earliest first."""

        async def body(db: aiosqlite.Connection) -> builtins.list[Reminder]:
            sql = (
                f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE user_id = ? AND fired_at IS NULL"
                " ORDER BY due_at, id"
            )
            return [reminder_from_row(r) for r in await _all(db, sql, (user_id,))]

        return await self._run("user_reminders", body, write=False)

    async def cancel_reminder(self, reminder_id: int, user_id: int) -> bool:
        """Delete one of ``user_id``'s reminders not yet fired; False if there is none such."""

        async def body(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(
                "DELETE FROM reminders WHERE id = ? AND user_id = ? AND fired_at IS NULL",
                (reminder_id, user_id),
            )
            return cur.rowcount > 0

        return await self._run("cancel_reminder", body)

    async def reminder_fired(self, reminder_id: int, *, now: float | None = None) -> None:
        """Mark a reminder fired (its delivery is in the queue); fired rows are deleted after a day."""
        stamp = self._now(now)

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE reminders SET fired_at = ? WHERE id = ? AND fired_at IS NULL", (stamp, reminder_id)
            )
            await db.execute("DELETE FROM reminders WHERE fired_at < ?", (stamp - DAY,))

        await self._run("reminder_fired", body)
