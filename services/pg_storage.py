"""The PostgreSQL store: what ``services.storage.SqliteStore`` keeps, shared by any number of bot
processes (``DATABASE_URL=postgresql://...``).

Same interface (``services.storage_protocol.Storage``), same promises, kept by PostgreSQL's own
means across processes:

- Every write is one transaction on a pooled connection (asyncpg), under
  ``asyncio.timeout(statement_timeout)`` (``CallTimeoutError``) and, when given, the storage breaker.
  A timeout or a cancel rolls the transaction back (asyncpg cancels the statement on the server and
  the pool rolls back before reusing the connection); a timeout on ``COMMIT`` itself is an ambiguous
  outcome, as with SQLite, and ``dedup_key`` / the processed ids make the retries idempotent. A
  connection that dies mid-transaction (kill -9 of the process) commits nothing: the server aborts it.
- Claims take due heads of conversations with ``SELECT ... FOR UPDATE SKIP LOCKED`` and a lease:
  two processes never claim one item, and neither waits for the other. A claim whose lease ran out
  (its holder died or hung) goes back to pending at the next claim in any process. A process's
  claims also name it (``claimed_by``); ``release_claims`` at start-up, and every heartbeat of every
  process, hand back those of processes that are gone, never those of a live one.
- A process is alive while its session connection holds the advisory lock (PROCESS_LOCK, its id):
  PostgreSQL releases it when the connection ends, kill -9 included. The same connection LISTENs
  for the other processes' notifications (``services.coordination``).
- Acceptances and enqueues of one conversation take a transaction-scoped advisory lock on it, so
  its items are numbered in the order they commit (a claim can never see a later item before an
  earlier one); acceptances under caps take one more, so counting and inserting are atomic across
  processes (two processes cannot both slip under a cap). One housekeeping batch runs at a time
  (``pg_try_advisory_xact_lock``): the others skip it.
- Schema: versioned SQL files in ``services/migrations/postgres`` (``NNNN_name.sql``), applied at
  start-up in one transaction under an advisory lock, so processes starting together migrate once.
  A database whose schema is newer than the files is refused (``SchemaTooNewError``).

Times are the callers' wall-clock seconds, as in SQLite: processes sharing a database need clocks
in step (NTP) for leases and retentions to mean the same everywhere.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import asyncpg
import structlog

from resilience.clock import Clock, SystemClock
from resilience.degradation import ItemKind, ItemState, QueueCaps, QueueItem, QueueStats
from resilience.errors import CallTimeoutError, QueueFullError
from services.coordination import (
    GONE_AFTER_SECONDS,
    MAX_PAYLOAD_BYTES,
    Handler,
    ProcessRecord,
    default_process_name,
)
from services.storage import (
    AVAILABILITY_WITHIN,
    CLAIM_RELEASED,
    COUNTED_SQL,
    DAY,
    HOUSEKEEPING_BATCH_ROWS,
    INCIDENTS_MAX,
    LEASE_RAN_OUT,
    REMINDER_COLUMNS,
    REMINDERS_PER_USER,
    SUM_USAGE_SQL,
    TERMINAL_STATES,
    USAGE_RETENTION_SECONDS,
    AlertRecord,
    AvailabilityDay,
    Breaker,
    Event,
    Housekeeping,
    IncidentRecord,
    QueueItemNotFoundError,
    Reminder,
    SchemaTooNewError,
    StorageError,
    StoreNotStartedError,
    TooManyRemindersError,
    Turn,
    TurnInput,
    UsageRecord,
    UsageRow,
    UsageTotals,
    bounded_history,
    check_housekeeping,
    item_from_row,
    reminder_from_row,
    totals_from_row,
    turn_rows,
    usage_day,
)
from services.storage import (
    migration_files as versioned_files,
)

T = TypeVar("T")
log = structlog.get_logger("storage.postgres")

MIGRATIONS_DIR = Path(__file__).with_name("migrations") / "postgres"

# Advisory lock classes (the first of the two int4 keys): "bot" and a number, so no other user of
# the database is likely to collide.
MIGRATION_LOCK = 0x626F7401
PROCESS_LOCK = 0x626F7402
CONVERSATION_LOCK = 0x626F7403
CAPS_LOCK = 0x626F7404
HOUSEKEEPING_LOCK = 0x626F7405
CHANNEL = "bot_events"
"""The LISTEN/NOTIFY channel every process listens on."""

PROCESS_KEEP_SECONDS = 3600.0
"""Rows of processes that stopped or died stay listed (as gone) this long, then are deleted."""
RECONNECT_CAP_SECONDS = 5.0

_QUEUE_COLUMNS = (
    "id, kind, conversation_key, payload, state, attempts, created_at, next_attempt_at, "
    "lease_until, last_error, dedup_key"
)
_QUEUE_COLUMNS_OF_QUEUE = ", ".join(f"queue.{c.strip()}" for c in _QUEUE_COLUMNS.split(","))

_NEWEST_TURNS_SQL = (
    "SELECT role, text, created_at, message_id, speaker FROM turns WHERE conversation_key = $1 "
    "ORDER BY id DESC LIMIT $2"
)
# Processes alive in this database: those whose session holds their advisory lock.
_ALIVE_SQL = (
    "SELECT l.objid::bigint FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.granted "
    f"AND l.classid = {PROCESS_LOCK}::oid AND l.objsubid = 2 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# A process id as the second int4 key of its lock.
_LOCK_KEY = 2_147_483_647
# Claims whose holder is gone: none named, a process row since deleted, or a process that no longer
# holds its lock and either stopped or has not beaten since $2 (a process whose session merely
# dropped still beats through its pool, and keeps its claims). Their items go back to pending.
_RELEASE_GONE_SQL = f"""UPDATE queue SET state = 'pending', lease_until = NULL, claimed_by = NULL,
        last_error = $1
    WHERE id IN (SELECT q.id FROM queue AS q WHERE q.state = 'claimed' AND (q.claimed_by IS NULL
        OR NOT EXISTS (SELECT 1 FROM processes AS p WHERE p.id = q.claimed_by)
        OR q.claimed_by IN (SELECT p.id FROM processes AS p WHERE (p.id % {_LOCK_KEY}) NOT IN ({_ALIVE_SQL})
            AND (p.stopped_at IS NOT NULL OR p.beat_at < $2)))
        FOR UPDATE OF q SKIP LOCKED)"""

_ACCEPT_SQL = f"""INSERT INTO queue (kind, conversation_key, payload, author_id, guild_id, notice, state,
        attempts, created_at, next_attempt_at, lease_until, claimed_by, dedup_key)
    SELECT $1::text, $2::text, $3::text, $4::bigint, $5::bigint, $6::boolean,
        CASE WHEN w.wait THEN 'pending' ELSE 'claimed' END, 0, $7::float8, $7::float8,
        CASE WHEN w.wait THEN NULL ELSE $8::float8 END, CASE WHEN w.wait THEN NULL ELSE $9::bigint END,
        $10::text
    FROM (SELECT NOT $11::boolean OR EXISTS (SELECT 1 FROM queue WHERE conversation_key = $2::text
        AND state = 'pending') AS wait) AS w
    RETURNING {_QUEUE_COLUMNS}, NOT EXISTS (SELECT 1 FROM queue AS o WHERE o.conversation_key = $2::text
        AND o.state IN ('pending', 'claimed') AND o.id < queue.id)"""

_ENQUEUE_SQL = f"""INSERT INTO queue (kind, conversation_key, payload, author_id, guild_id, notice, state,
        attempts, created_at, next_attempt_at, dedup_key)
    VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $8) RETURNING {_QUEUE_COLUMNS}"""

_REAP_SQL = """UPDATE queue SET state = 'pending', lease_until = NULL, claimed_by = NULL, last_error = $2
    WHERE id IN (SELECT id FROM queue WHERE state = 'claimed' AND lease_until <= $1
                 FOR UPDATE SKIP LOCKED)"""

_PENDING_BY_AUTHOR_SQL = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM queue WHERE state = 'pending' AND kind = 'inbound' "
    "AND author_id = $1 LIMIT $2) AS c"
)
_PENDING_BY_GUILD_SQL = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM queue WHERE state = 'pending' AND kind = 'inbound' "
    "AND guild_id = $1 LIMIT $2) AS c"
)
_LIVE_ITEMS_SQL = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM queue WHERE state IN ('pending', 'claimed') LIMIT $1) AS c"
)

_ADD_USAGE_SQL = """INSERT INTO token_usage (day, user_id, guild_id, model, calls, prompt_tokens,
        output_tokens, thought_tokens, cached_tokens) VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8)
    ON CONFLICT (day, user_id, guild_id, model) DO UPDATE SET calls = token_usage.calls + 1,
        prompt_tokens = token_usage.prompt_tokens + EXCLUDED.prompt_tokens,
        output_tokens = token_usage.output_tokens + EXCLUDED.output_tokens,
        thought_tokens = token_usage.thought_tokens + EXCLUDED.thought_tokens,
        cached_tokens = token_usage.cached_tokens + EXCLUDED.cached_tokens"""

# Housekeeping's deletions, each of at most $n rows through an index; SKIP LOCKED: a row another
# transaction holds is left for the next round rather than waited for. The rows are chosen once, in
# a MATERIALIZED CTE: as ``WHERE id IN (SELECT ... LIMIT n)`` PostgreSQL may run the sub-select
# again (a nested-loop rescan, a concurrent update), and with SKIP LOCKED each run picks other rows,
# so more than n went (seen under load: the batch's room went negative).
_PRUNE_FINISHED_SQL = (
    "WITH doomed AS MATERIALIZED (SELECT id FROM queue WHERE state IN ('done', 'dead', 'expired') "
    "AND state = $1 AND finished_at < $2 LIMIT $3 FOR UPDATE SKIP LOCKED) "
    "DELETE FROM queue q USING doomed WHERE q.id = doomed.id"
)
_PRUNE_TURNS_SQL = (
    "WITH doomed AS MATERIALIZED (SELECT id FROM turns WHERE created_at < $1 LIMIT $2 "
    "FOR UPDATE SKIP LOCKED) DELETE FROM turns t USING doomed WHERE t.id = doomed.id"
)
_PRUNE_PROCESSED_SQL = (
    "WITH doomed AS MATERIALIZED (SELECT message_id FROM processed WHERE processed_at < $1 "
    "LIMIT $2 FOR UPDATE SKIP LOCKED) "
    "DELETE FROM processed p USING doomed WHERE p.message_id = doomed.message_id"
)
_PRUNE_USAGE_SQL = (
    "WITH doomed AS MATERIALIZED (SELECT day, user_id, guild_id, model FROM token_usage WHERE day < $1 "
    "LIMIT $2 FOR UPDATE SKIP LOCKED) DELETE FROM token_usage u USING doomed WHERE u.day = doomed.day "
    "AND u.user_id = doomed.user_id AND u.guild_id = doomed.guild_id AND u.model = doomed.model"
)

# SQLSTATEs that say "the database is not there now", not "this statement is wrong": connection
# failures (class 08), server shutting down or starting (57P01-57P03), too many connections,
# deadlock and serialization failures (retrying is the remedy).
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "40P01", "40001"})


class DatabaseUnavailableError(StorageError, ConnectionError):
    """PostgreSQL cannot be reached or is not serving now (a ``ConnectionError``: transient)."""


class DatabaseError(StorageError):
    """PostgreSQL refused a statement (``sqlstate`` says why)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def describe_url(url: str) -> str:
    """``host:port/database`` of a ``postgresql://`` URL: where it points, without the credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or '/'}"


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL characters (SQLite can): they become U+FFFD."""
    return None if text is None else text.replace("\x00", "\ufffd")


def _encode(payload: dict[str, Any]) -> str:
    # ASCII JSON (ensure_ascii): a NUL in a value is written as \\u0000, which text keeps.
    return json.dumps(payload, separators=(",", ":"))


def _owner(payload: dict[str, Any], key: str) -> int | None:
    """An author or guild id of a payload, as the caps count it (None unless a whole number)."""
    value = payload.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _payload_columns(payload: dict[str, Any]) -> tuple[str, int | None, int | None, bool]:
    """``(payload text, author_id, guild_id, notice)``: what the queue keeps of a payload."""
    return _encode(payload), _owner(payload, "author_id"), _owner(payload, "guild_id"), (
        payload.get("notice") is not None
    )


def _status_count(status: str) -> int:
    """The row count of a command status (``UPDATE 3``, ``INSERT 0 1``, ``DELETE 7``)."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is not there now, rather than that the statement is wrong."""
    state = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, OSError | asyncpg.ConnectionDoesNotExistError | asyncpg.PostgresConnectionError)
        or (isinstance(state, str) and (state.startswith("08") or state in _UNAVAILABLE_STATES))
    )


def as_storage_error(exc: BaseException) -> StorageError:
    """The store's error for an asyncpg or socket failure. A connection that died under the call
    (asyncpg then also fails the rollback: the first error is the context of the last) is the
    database being unavailable, whatever the last error says about the half-done call."""
    if isinstance(exc, StorageError):
        return exc
    unavailable, depth = False, 0
    link: BaseException | None = exc
    while link is not None and depth < 5 and not unavailable:
        unavailable = _unavailable(link)
        link, depth = link.__cause__ or link.__context__, depth + 1
    state = getattr(exc, "sqlstate", None)
    text = f"{type(exc).__name__}: {exc}"[:500]
    if unavailable:
        return DatabaseUnavailableError(text)
    return DatabaseError(text, state if isinstance(state, str) else None)


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """The PostgreSQL schema's versioned SQL files, in order (``services.storage.migration_files``)."""
    return versioned_files(directory)


async def probe(url: str, *, within: float = 5.0) -> int | None:
    """The schema version of the database at ``url`` (None: the bot has not created its tables
    yet), without changing anything; ``DatabaseUnavailableError`` when it cannot be reached."""
    try:
        async with asyncio.timeout(within):
            conn = await asyncpg.connect(url)
            try:
                exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
                if not exists:
                    return None
                return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            finally:
                await conn.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise DatabaseUnavailableError(
            f"cannot reach PostgreSQL at {describe_url(url)}: {type(exc).__name__}: {exc}"[:500]
        ) from exc


Body = Callable[[asyncpg.Connection], Awaitable[T]]


class PostgresStore:
    """The bot's storage on PostgreSQL (see the module docstring); ``Storage`` and ``Coordination``.

    A registry service (``name``, ``depends_on``, ``start``, ``stop``, ``health``). ``register``
    False (the migration tool, benchmarks) takes no process row and listens to nothing: its claims
    name no holder, so any process's heartbeat hands them back.
    """

    name = "storage"
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        url: str,
        *,
        statement_timeout: float = 5.0,
        history_max_messages: int = 20,
        history_max_chars: int = 12000,
        events_max: int = 500,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
        clock: Clock | None = None,
        breaker: Breaker | None = None,
        process_name: str | None = None,
        register: bool = True,
        migrations_dir: Path = MIGRATIONS_DIR,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.url = url
        self.location = describe_url(url)
        self.statement_timeout = statement_timeout
        self.history_max_messages = history_max_messages
        self.history_max_chars = history_max_chars
        self.events_max = events_max
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.process_name = process_name or default_process_name()
        self.register = register
        self.migrations_dir = migrations_dir
        self._clock: Clock = clock or SystemClock()
        self._breaker = breaker
        self._pool: asyncpg.Pool | None = None
        self._session: asyncpg.Connection | None = None
        self._process_id: int | None = None
        self._schema_version = 0
        self._handlers: dict[str, list[Handler]] = {}
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._session_lost = asyncio.Event()
        self._last_error: str | None = None
        self._consecutive_failures = 0
        self.notifications_received = 0

    # -- lifecycle -------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        # The server stops a statement a little after the client gave up on it, and ends a
        # transaction left idle by a frozen process, so it cannot hold its locks for long.
        statement_ms = int(self.statement_timeout * 1000) + 1000
        return {
            "application_name": f"gemini-bot {self.process_name}"[:63],
            "statement_timeout": str(statement_ms),
            "idle_in_transaction_session_timeout": str(max(10_000, 4 * statement_ms)),
        }

    async def start(self) -> None:
        """Open the pool, migrate under the migration lock, register this process; idempotent.

        Raises ``DatabaseUnavailableError`` (naming host, port and database, never the password)
        when PostgreSQL cannot be reached, ``SchemaTooNewError`` for a database of a newer bot.
        """
        if self._pool is not None:
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                pool = await asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    server_settings=self._server_settings(),
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DatabaseUnavailableError(
                f"cannot reach PostgreSQL at {self.location}: {type(exc).__name__}: {exc}"[:500]
            ) from exc
        try:
            await self._migrate(pool)
            self._pool = pool
            self._process_id = None  # a start after a stop is another process, with a row of its own
            if self.register:
                await self._open_session()
                self._consumer = asyncio.create_task(self._consume(), name="pg-notifications")
                self._watcher = asyncio.create_task(self._watch_session(), name="pg-session")
        except BaseException:
            self._pool = None
            await self._close_session()
            await pool.close()
            raise

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        files = migration_files(self.migrations_dir)
        supported = len(files)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            if current > supported:
                raise SchemaTooNewError(Path(self.location), current, supported)
            for version, path in files[current:]:
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                log.info("storage.migrated", version=version, file=path.name, database=self.location)
        self._schema_version = supported

    async def _open_session(self) -> None:
        """This process's own connection: its row, its lock (its liveness), its LISTEN."""
        session = await asyncpg.connect(
            self.url, timeout=self.connect_timeout, server_settings=self._server_settings()
        )
        try:
            now = self._clock.time()
            if self._process_id is None:
                self._process_id = await session.fetchval(
                    "INSERT INTO processes (name, started_at, beat_at) VALUES ($1, $2, $2) RETURNING id",
                    self.process_name, now,
                )
            # try, not wait: after a lost connection the server may not have ended the old session
            # yet (it still holds the lock); the watcher tries again shortly.
            key = self._lock_key()
            locked = await session.fetchval("SELECT pg_try_advisory_lock($1, $2)", PROCESS_LOCK, key)
            if not locked:
                raise DatabaseUnavailableError(f"process {self._process_id}'s lock is still held")
            await session.add_listener(CHANNEL, self._on_notification)
            session.add_termination_listener(self._on_session_end)
        except BaseException:
            session.terminate()
            raise
        self._session = session
        self._session_lost.clear()

    def _lock_key(self) -> int:
        assert self._process_id is not None
        return self._process_id % _LOCK_KEY

    def _on_session_end(self, connection: asyncpg.Connection) -> None:
        if connection is self._session:
            self._session_lost.set()

    async def _watch_session(self) -> None:
        """Open the session again when it ends (PostgreSQL restarted, the network cut it)."""
        delay = 0.1
        while True:
            await self._session_lost.wait()
            old, self._session = self._session, None
            if old is not None:
                old.terminate()
            log.warning("storage.session_lost", database=self.location, process=self._process_id)
            try:
                await self._open_session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("storage.session_reopen_failed", error=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_CAP_SECONDS)
                self._session_lost.set()
                continue
            delay = 0.1
            # Notifications sent meanwhile are lost: tell the subscribers to read everything again.
            self._inbox.put_nowait(json.dumps({"kind": "resync", "origin": None}))

    async def _close_session(self) -> None:
        for task in (self._watcher, self._consumer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._consumer = None
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await session.close()
            if not session.is_closed():
                session.terminate()

    async def stop(self) -> None:
        """Mark this process stopped, close its session (its claims become releasable) and the pool.
        Safe to call twice."""
        pool = self._pool
        if pool is None:
            return
        if self._process_id is not None and self.register:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await pool.execute(
                        "UPDATE processes SET stopped_at = $2 WHERE id = $1",
                        self._process_id, self._clock.time(),
                    )
        await self._close_session()
        self._pool = None
        try:
            async with asyncio.timeout(5.0):
                await pool.close()
        except TimeoutError:
            pool.terminate()

    def health(self) -> dict[str, Any]:
        """Open, and the last operation did not fail; where, which schema, which process."""
        return {
            "ok": self._pool is not None and self._consecutive_failures == 0,
            "open": self._pool is not None,
            "backend": "postgresql",
            "database": self.location,
            "schema_version": self._schema_version,
            "process_id": self._process_id,
            "listening": self._session is not None and not self._session.is_closed(),
            "consecutive_failures": self._consecutive_failures,
            "last_error": self._last_error,
        }

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def schema_version(self) -> int:
        """The version recorded in the database."""

        async def body(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

        return await self._run("schema_version", body, write=False)

    # -- the transaction runner ------------------------------------------------------------

    async def transaction(self, operation: str, body: Body[T]) -> T:
        """Run ``body(connection)`` in one transaction under the breaker and the timeout (for the
        shared state, which keeps its rows in this database)."""
        return await self._run(operation, body)

    async def _run(self, operation: str, body: Body[T], *, write: bool = True) -> T:
        if self._breaker is not None:
            return await self._breaker.call(self._transaction, operation, body, write)
        return await self._transaction(operation, body, write)

    async def _transaction(self, operation: str, body: Body[T], write: bool) -> T:
        pool = self._pool
        if pool is None:
            raise StoreNotStartedError(f"storage.{operation} called while the store is closed")
        try:
            async with asyncio.timeout(self.statement_timeout):
                async with pool.acquire() as conn:
                    if not write:  # one statement (or a read that needs no snapshot across them)
                        result = await body(conn)
                    else:
                        async with conn.transaction():
                            result = await body(conn)
        except TimeoutError as exc:
            self._failed(f"{operation}: timed out after {self.statement_timeout}s")
            raise CallTimeoutError(f"storage.{operation}", self.statement_timeout) from exc
        except asyncpg.QueryCanceledError as exc:  # the server's statement_timeout
            self._failed(f"{operation}: cancelled by the server")
            raise CallTimeoutError(f"storage.{operation}", self.statement_timeout) from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            wrapped = as_storage_error(exc)
            self._failed(f"{operation}: {wrapped}")
            raise wrapped from exc
        self._consecutive_failures = 0
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
        """Store ``(role, text, message_id)`` turns and ``usage`` in one transaction."""
        rows = self._turn_rows(key, turns, now)

        async def body(conn: asyncpg.Connection) -> None:
            if rows:
                await self._insert_turns(conn, key, rows)
            if usage is not None:
                await conn.execute(_ADD_USAGE_SQL, *usage.row())

        await self._run("append_turns", body)

    def _turn_rows(
        self, key: str, turns: Sequence[TurnInput], now: float | None
    ) -> list[tuple[str, str, str, str | None, float, str | None]]:
        rows = turn_rows(key, turns, self._now(now), self.history_max_chars)
        return [
            (k, role, _clean(text) or "", _clean(mid), at, _clean(speaker))
            for k, role, text, mid, at, speaker in rows
        ]

    async def _insert_turns(
        self,
        conn: asyncpg.Connection,
        key: str,
        rows: list[tuple[str, str, str, str | None, float, str | None]],
    ) -> None:
        await conn.executemany(
            "INSERT INTO turns (conversation_key, role, text, message_id, created_at, speaker) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            rows,
        )
        await conn.execute(
            "DELETE FROM turns WHERE conversation_key = $1 AND id NOT IN "
            "(SELECT id FROM turns WHERE conversation_key = $1 ORDER BY id DESC LIMIT $2)",
            key, self.history_max_messages,
        )

    async def history(self, key: str) -> list[Turn]:
        """The newest turns, oldest first, within both the message and the character bound."""

        async def body(conn: asyncpg.Connection) -> list[Turn]:
            return await self._newest_turns(conn, key)

        return bounded_history(await self._run("history", body, write=False), self.history_max_chars)

    async def history_if_next(self, key: str, item_id: int) -> list[Turn] | None:
        """The history for answering ``item_id``, or None while an older item of the conversation
        is queued or being worked on."""

        async def body(conn: asyncpg.Connection) -> list[Turn] | None:
            older = await conn.fetchval(
                "SELECT 1 FROM queue WHERE conversation_key = $1 AND state IN ('pending', 'claimed') "
                "AND id < $2 LIMIT 1",
                key, item_id,
            )
            return None if older is not None else await self._newest_turns(conn, key)

        newest_first = await self._run("history_if_next", body, write=False)
        return None if newest_first is None else bounded_history(newest_first, self.history_max_chars)

    async def _newest_turns(self, conn: asyncpg.Connection, key: str) -> list[Turn]:
        rows = await conn.fetch(_NEWEST_TURNS_SQL, key, self.history_max_messages)
        return [Turn(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def forget(self, key: str, *, branches: bool = False) -> int:
        """Delete a conversation's history and its file references; return how many turns went.
        With ``branches``, also the conversations branched off it (keys ``"<key>:<id>"``)."""
        where = "conversation_key = $1"
        args: tuple[str, ...] = (key,)
        if branches:
            # A range on the key (":" + 1 is ";"), so the deletion goes through the key's index.
            where = "(conversation_key = $1 OR (conversation_key >= $2 AND conversation_key < $3))"
            args = (key, f"{key}:", f"{key};")

        async def body(conn: asyncpg.Connection) -> int:
            status = await conn.execute(f"DELETE FROM turns WHERE {where}", *args)
            await conn.execute(f"DELETE FROM attachment_refs WHERE {where}", *args)
            return _status_count(status)

        return await self._run("forget", body)

    async def branch(self, question_id: str | int, new_key: str) -> str | None:
        """The conversation a reply to the answer of question ``question_id`` continues (see
        ``SqliteStore.branch``): its own when that exchange is still the latest, else ``new_key``
        started as a copy of it up to the exchange; None when no conversation holds the question.
        One transaction; the new branch's key is locked so two processes do not both copy it."""
        qid = str(question_id)
        limit = self.history_max_messages

        async def body(conn: asyncpg.Connection) -> str | None:
            row = await conn.fetchrow(
                "SELECT conversation_key, id FROM turns WHERE message_id = $1 AND role = 'user' "
                "ORDER BY id LIMIT 1",
                qid,
            )
            if row is None:
                return None
            key, asked = str(row[0]), int(row[1])
            latest = await conn.fetchval(
                "SELECT MAX(id) FROM turns WHERE conversation_key = $1 AND role = 'user'", key
            )
            if latest == asked:
                return key
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", new_key)
            if await conn.fetchval("SELECT 1 FROM turns WHERE conversation_key = $1 LIMIT 1", new_key):
                return new_key
            answered = await conn.fetchval(
                "SELECT MIN(id) FROM turns WHERE conversation_key = $1 AND role = 'model' AND id > $2",
                key, asked,
            )
            end = answered if answered is not None else asked
            await conn.execute(
                "INSERT INTO turns (conversation_key, role, text, message_id, created_at, speaker) "
                "SELECT $1, role, text, message_id, created_at, speaker FROM (SELECT * FROM turns "
                "WHERE conversation_key = $2 AND id <= $3 ORDER BY id DESC LIMIT $4) AS t ORDER BY id",
                new_key, key, end, limit,
            )
            return new_key

        return await self._run("branch", body)

    async def prune_history(self, older_than_seconds: float, *, now: float | None = None) -> int:
        """Delete turns older than the given age; return how many."""
        cutoff = self._now(now) - older_than_seconds

        async def body(conn: asyncpg.Connection) -> int:
            return _status_count(await conn.execute("DELETE FROM turns WHERE created_at < $1", cutoff))

        return await self._run("prune_history", body)

    # -- file references of the history ------------------------------------------------------

    async def record_attachment_refs(
        self,
        key: str,
        message_id: str | int,
        refs: Sequence[dict[str, Any]],
        *,
        keep: int,
        now: float | None = None,
    ) -> None:
        """Store one message's file references and keep the conversation's newest ``keep``."""
        stamp = self._now(now)
        rows = [(key, str(message_id), _encode(ref), stamp) for ref in refs]

        async def body(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                "INSERT INTO attachment_refs (conversation_key, message_id, data, created_at) "
                "VALUES ($1, $2, $3, $4)",
                rows,
            )
            await conn.execute(
                "DELETE FROM attachment_refs WHERE conversation_key = $1 AND id NOT IN "
                "(SELECT id FROM attachment_refs WHERE conversation_key = $1 ORDER BY id DESC LIMIT $2)",
                key, keep,
            )

        await self._run("record_attachment_refs", body)

    async def attachment_refs(
        self, key: str, *, limit: int
    ) -> builtins.list[tuple[int, str, dict[str, Any]]]:
        """The newest ``limit`` file references of conversation ``key``, oldest first."""

        async def body(conn: asyncpg.Connection) -> list[tuple[int, str, dict[str, Any]]]:
            rows = await conn.fetch(
                "SELECT id, message_id, data FROM attachment_refs WHERE conversation_key = $1 "
                "ORDER BY id DESC LIMIT $2",
                key, limit,
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
        """Replace one file reference."""

        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute("UPDATE attachment_refs SET data = $1 WHERE id = $2", _encode(ref), ref_id)

        await self._run("update_attachment_ref", body)

    async def attachment_ref_keys(self) -> set[str]:
        """The conversations that have file references."""

        async def body(conn: asyncpg.Connection) -> set[str]:
            rows = await conn.fetch("SELECT DISTINCT conversation_key FROM attachment_refs")
            return {str(row[0]) for row in rows}

        return await self._run("attachment_ref_keys", body, write=False)

    async def prune_attachment_refs(self, older_than_seconds: float, *, now: float | None = None) -> int:
        """Delete file references older than the given age, at most ``HOUSEKEEPING_BATCH_ROWS``."""
        cutoff = self._now(now) - older_than_seconds

        async def body(conn: asyncpg.Connection) -> int:
            return _status_count(
                await conn.execute(
                    "WITH doomed AS MATERIALIZED (SELECT id FROM attachment_refs WHERE created_at < $1 "
                    "LIMIT $2 FOR UPDATE SKIP LOCKED) DELETE FROM attachment_refs a USING doomed "
                    "WHERE a.id = doomed.id",
                    cutoff, HOUSEKEEPING_BATCH_ROWS,
                )
            )

        return await self._run("prune_attachment_refs", body)

    # -- the durable queue -------------------------------------------------------------------

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
        """Add an item, or return the existing one with the same ``dedup_key`` (``QueueFullError``
        for a new inbound item over one of ``caps``; outbound items ignore them)."""
        kind = ItemKind(kind)
        text, author, guild, notice = _payload_columns(payload)
        check = caps if kind is ItemKind.INBOUND else None

        async def body(conn: asyncpg.Connection) -> QueueItem | QueueFullError:
            await self._lock_conversation(conn, conversation_key)
            if dedup_key is not None:  # looked up first, so a replay burns no id
                existing = await conn.fetchrow(
                    f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE dedup_key = $1", dedup_key
                )
                if existing is not None:
                    return item_from_row(existing)
            if check is not None:
                refused = await self._refusal(conn, check, payload)
                if refused is not None:
                    return refused  # returned, not raised: a refusal is no failure of the store
            row = await conn.fetchrow(
                _ENQUEUE_SQL, kind.value, conversation_key, text, author, guild, notice, now, dedup_key
            )
            return item_from_row(row)

        item = await self._run("enqueue", body)
        if isinstance(item, QueueFullError):
            raise item
        return item

    @staticmethod
    async def _lock_conversation(conn: asyncpg.Connection, key: str) -> None:
        """Until this transaction ends, no other adds an item to conversation ``key`` (so ids
        commit in order within it)."""
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", CONVERSATION_LOCK, key)

    @staticmethod
    async def _refusal(
        conn: asyncpg.Connection, caps: QueueCaps, payload: dict[str, Any]
    ) -> QueueFullError | None:
        """The cap a new inbound item would break, most specific first; None if none. Under the caps
        lock: no other process counts or inserts between this count and this transaction's end."""
        await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", CAPS_LOCK)
        author, guild = _owner(payload, "author_id"), _owner(payload, "guild_id")
        checks: tuple[tuple[str, int | None, int | None, str, tuple[Any, ...]], ...] = (
            ("user", caps.max_pending_per_user, author, _PENDING_BY_AUTHOR_SQL, (author,)),
            ("guild", caps.max_pending_per_guild, guild, _PENDING_BY_GUILD_SQL, (guild,)),
            ("queue", caps.max_items, None, _LIVE_ITEMS_SQL, ()),
        )
        for scope, cap, owner, sql, args in checks:
            if cap is None or (scope != "queue" and owner is None):
                continue
            if await conn.fetchval(sql, *args, cap) >= cap:
                return QueueFullError(scope, cap, owner)
        return None

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

        ``FOR UPDATE SKIP LOCKED``: a head another process is claiming right now is skipped, not
        waited for, and never taken twice. Claims whose lease ran out return to pending first,
        marked ``LEASE_RAN_OUT``.
        """
        kind_filter = "" if kind is None else f"AND q.kind = '{ItemKind(kind).value}'"
        order = "q.attempts, q.id" if fewest_attempts_first else "q.id"
        # A head: a due pending item that is the oldest live item of its conversation (one probe of
        # the queue_live index each, whatever the statistics say), in order until ``limit`` are found.
        sql = f"""WITH picked AS (
                SELECT q.id FROM queue AS q
                WHERE q.state = 'pending' AND q.next_attempt_at <= $1 {kind_filter}
                AND q.id = (SELECT o.id FROM queue AS o WHERE o.conversation_key = q.conversation_key
                            AND o.state IN ('pending', 'claimed') ORDER BY o.id LIMIT 1)
                ORDER BY {order} LIMIT $2 FOR UPDATE OF q SKIP LOCKED
            )
            UPDATE queue SET state = 'claimed', lease_until = $3, claimed_by = $4
            FROM picked WHERE queue.id = picked.id RETURNING {_QUEUE_COLUMNS_OF_QUEUE}"""

        async def body(conn: asyncpg.Connection) -> list[QueueItem]:
            await conn.execute(_REAP_SQL, now, LEASE_RAN_OUT)
            rows = await conn.fetch(sql, now, limit, now + lease_seconds, self._process_id)
            return sorted((item_from_row(r) for r in rows), key=lambda item: item.id)

        return await self._run("claim", body)

    async def complete(self, item_id: int, *, now: float | None = None) -> None:
        """Mark an item done (at ``now``, which starts its retention)."""
        await self._set_state(
            "complete", item_id, "state = 'done', lease_until = NULL, claimed_by = NULL, finished_at = $1",
            (self._now(now),),
        )

    async def fail(self, item_id: int, error: str, *, next_attempt_at: float) -> QueueItem:
        """Return a claimed item to pending with ``attempts + 1`` and its next attempt time."""
        return await self._set_state(
            "fail",
            item_id,
            "state = 'pending', attempts = attempts + 1, lease_until = NULL, claimed_by = NULL, "
            "last_error = $1, next_attempt_at = $2",
            (_clean(error), next_attempt_at),
        )

    async def dead_letter(self, item_id: int, error: str, *, now: float | None = None) -> QueueItem:
        """Give up on an item for good (at ``now``, which starts its retention)."""
        return await self._set_state(
            "dead_letter",
            item_id,
            "state = 'dead', lease_until = NULL, claimed_by = NULL, last_error = $1, finished_at = $2",
            (_clean(error), self._now(now)),
        )

    async def expire(self, *, now: float, max_age: float) -> list[QueueItem]:
        """Mark pending items (and crashed claims) older than ``max_age`` expired and return them;
        each once, whichever process expires it."""

        async def body(conn: asyncpg.Connection) -> list[QueueItem]:
            await conn.execute(_REAP_SQL, now, LEASE_RAN_OUT)
            rows = await conn.fetch(
                f"UPDATE queue SET state = 'expired', finished_at = $1 WHERE id IN (SELECT id FROM queue "
                f"WHERE state = 'pending' AND created_at < $2 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_QUEUE_COLUMNS}",
                now, now - max_age,
            )
            return sorted((item_from_row(r) for r in rows), key=lambda item: item.id)

        return await self._run("expire", body)

    async def position(self, item_id: int) -> int:
        """1-based position among pending inbound+outbound items (0 if not pending)."""

        async def body(conn: asyncpg.Connection) -> int:
            value = await conn.fetchval(
                "SELECT CASE WHEN (SELECT state FROM queue WHERE id = $1) = 'pending' "
                "THEN (SELECT COUNT(*) FROM queue WHERE state = 'pending' AND id <= $1) ELSE 0 END",
                item_id,
            )
            return int(value or 0)

        return await self._run("position", body, write=False)

    async def stats(self, *, now: float) -> QueueStats:
        """Depth by (kind, state) and the age of the oldest pending item."""

        async def body(conn: asyncpg.Connection) -> QueueStats:
            rows = await conn.fetch(
                "SELECT kind, state, COUNT(*), MIN(created_at) FROM queue GROUP BY kind, state"
            )
            depth = {(ItemKind(k), ItemState(s)): int(n) for k, s, n, _ in rows}
            pending = [first for _, s, _, first in rows if s == ItemState.PENDING.value]
            oldest = max(0.0, now - min(pending)) if pending else None
            return QueueStats(depth=depth, oldest_pending_age=oldest)

        return await self._run("stats", body, write=False)

    async def purge(self, state: ItemState) -> int:
        """Delete items in a terminal state (done, dead, expired); return how many."""
        state = ItemState(state)
        if state not in TERMINAL_STATES:
            raise ValueError(f"only terminal states can be purged, not {state.value!r}")

        async def body(conn: asyncpg.Connection) -> int:
            return _status_count(await conn.execute("DELETE FROM queue WHERE state = $1", state.value))

        return await self._run("purge", body)

    async def get(self, item_id: int) -> QueueItem | None:
        """One item by id, or None."""

        async def body(conn: asyncpg.Connection) -> QueueItem | None:
            row = await conn.fetchrow(f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE id = $1", item_id)
            return None if row is None else item_from_row(row)

        return await self._run("get", body, write=False)

    # -- acceptance and requeueing -------------------------------------------------------------

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
        """Accept a message durably: mark its id processed and store its work item, atomically
        (see ``SqliteStore.accept``). None for a replay, in this process or any other."""
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
        """``accept(claim=True)`` that also reads the history when the item is next, in the same
        transaction (see ``SqliteStore.accept_with_history``)."""
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
        text, author, guild, notice = _payload_columns(payload)
        mid = str(message_id)

        async def body(
            conn: asyncpg.Connection,
        ) -> tuple[QueueItem, list[Turn] | None] | QueueFullError | None:
            await self._lock_conversation(conn, conversation_key)
            # The replay check comes before the caps (a replay is ignored, never refused).
            if await conn.fetchval("SELECT 1 FROM processed WHERE message_id = $1", mid) is not None:
                return None
            if check is not None:
                refused = await self._refusal(conn, check, payload)
                if refused is not None:
                    return refused  # nothing written: a refusal leaves no trace
            # Another process accepting the same id right now waits on the unique key, then sees it.
            inserted = await conn.fetchval(
                "INSERT INTO processed (message_id, processed_at) VALUES ($1, $2) "
                "ON CONFLICT (message_id) DO NOTHING RETURNING 1",
                mid, now,
            )
            if inserted is None:
                return None
            row = await conn.fetchrow(
                _ACCEPT_SQL, kind.value, conversation_key, text, author, guild, notice, now,
                now + lease_seconds, self._process_id, f"msg:{message_id}", claim,
            )
            item = item_from_row(row)
            if not with_history or item.state is not ItemState.CLAIMED or not row[-1]:
                return item, None
            return item, await self._newest_turns(conn, conversation_key)

        accepted = await self._run("accept", body)
        if isinstance(accepted, QueueFullError):
            raise accepted
        if accepted is None or accepted[1] is None:
            return accepted
        return accepted[0], bounded_history(accepted[1], self.history_max_chars)

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
        """Return a claimed item to pending (keeping its id and place), optionally as another kind
        with a new payload; ``count_attempt`` False when it was not really tried."""
        sets = ["state = 'pending'", "lease_until = NULL", "claimed_by = NULL", "last_error = $1",
                "next_attempt_at = $2"]
        args: list[Any] = [_clean(error), next_attempt_at]
        if count_attempt:
            sets.append("attempts = attempts + 1")
        self._payload_sets(sets, args, kind, payload)
        return await self._set_state("requeue", item_id, ", ".join(sets), tuple(args))

    @staticmethod
    def _payload_sets(
        sets: list[str], args: list[Any], kind: ItemKind | None, payload: dict[str, Any] | None
    ) -> None:
        if kind is not None:
            args.append(ItemKind(kind).value)
            sets.append(f"kind = ${len(args)}")
        if payload is not None:
            columns = ("payload", "author_id", "guild_id", "notice")
            for column, value in zip(columns, _payload_columns(payload), strict=True):
                args.append(value)
                sets.append(f"{column} = ${len(args)}")

    async def finish(
        self,
        item_id: int,
        *,
        key: str | None = None,
        turns: Sequence[TurnInput] = (),
        now: float | None = None,
        usage: UsageRecord | None = None,
    ) -> None:
        """Mark an item done and store the exchange (and ``usage``), in one transaction."""
        if turns and key is None:
            raise ValueError("turns need the conversation key")
        rows = self._turn_rows(key or "", turns, now)
        stamp = self._now(now)

        async def body(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "UPDATE queue SET state = 'done', lease_until = NULL, claimed_by = NULL, finished_at = $1 "
                "WHERE id = $2",
                stamp, item_id,
            )
            if _status_count(status) != 1:
                return False
            if rows:
                await self._insert_turns(conn, key or "", rows)
            if usage is not None:
                await conn.execute(_ADD_USAGE_SQL, *usage.row())
            return True

        if not await self._run("finish", body):  # raised outside the breaker: not a storage failure
            raise QueueItemNotFoundError(item_id)

    async def update_payload(
        self, item_id: int, payload: dict[str, Any], *, kind: ItemKind | None = None
    ) -> QueueItem:
        """Replace an item's payload (and kind), keeping its state and lease."""
        sets: list[str] = []
        args: list[Any] = []
        self._payload_sets(sets, args, kind, payload)
        return await self._set_state("update_payload", item_id, ", ".join(sets), tuple(args))

    async def release_claims(self) -> int:
        """Return to pending every claim whose holder is gone: it stopped, or it lost its connection
        (its lock) and has not beaten for ``GONE_AFTER_SECONDS``. Claims of live processes, this one
        included, are left alone: their leases cover them. Each is marked ``CLAIM_RELEASED``
        (``claim_abandoned``). The heartbeat (``beat``) does the same every few seconds."""

        async def body(conn: asyncpg.Connection) -> int:
            cutoff = self._clock.time() - GONE_AFTER_SECONDS
            return _status_count(await conn.execute(_RELEASE_GONE_SQL, CLAIM_RELEASED, cutoff))

        return await self._run("release_claims", body)

    async def _set_state(
        self, operation: str, item_id: int, assignments: str, args: tuple[Any, ...]
    ) -> QueueItem:
        sql = f"UPDATE queue SET {assignments} WHERE id = ${len(args) + 1} RETURNING {_QUEUE_COLUMNS}"

        async def body(conn: asyncpg.Connection) -> Any:
            return await conn.fetchrow(sql, *args, item_id)

        row = await self._run(operation, body)
        if row is None:  # raised outside the breaker: an unknown id is not a storage failure
            raise QueueItemNotFoundError(item_id)
        return item_from_row(row)

    # -- processed message ids -------------------------------------------------------------

    async def mark_processed(self, message_id: str | int, *, now: float | None = None) -> bool:
        """Record a message as answered; True if newly marked, False if it already was."""
        stamp = self._now(now)

        async def body(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "INSERT INTO processed (message_id, processed_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                str(message_id), stamp,
            )
            return _status_count(status) == 1

        return await self._run("mark_processed", body)

    async def is_processed(self, message_id: str | int) -> bool:
        """Whether a message was already answered."""

        async def body(conn: asyncpg.Connection) -> bool:
            found = await conn.fetchval("SELECT 1 FROM processed WHERE message_id = $1", str(message_id))
            return found is not None

        return await self._run("is_processed", body, write=False)

    async def prune_processed(self, older_than_seconds: float, now: float | None = None) -> int:
        """Forget processed ids older than the given age; return how many."""
        cutoff = self._now(now) - older_than_seconds

        async def body(conn: asyncpg.Connection) -> int:
            return _status_count(await conn.execute("DELETE FROM processed WHERE processed_at < $1", cutoff))

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
        """Delete what is past its retention in short transactions (see ``SqliteStore.housekeeping``).

        One process at a time: a batch starts by trying the housekeeping lock, and a process that
        does not get it (another one is deleting) stops and reports nothing done.
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
        targets: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
            ("done_items", _PRUNE_FINISHED_SQL, ("done", now - done_retention)),
            ("dead_items", _PRUNE_FINISHED_SQL, ("dead", now - queue_retention)),
            ("expired_items", _PRUNE_FINISHED_SQL, ("expired", now - queue_retention)),
            ("turns", _PRUNE_TURNS_SQL, (now - history_retention,)),
            ("processed_ids", _PRUNE_PROCESSED_SQL, (now - processed_retention,)),
            ("usage_rows", _PRUNE_USAGE_SQL, (usage_day(now - usage_retention),)),
        )

        async def batch(conn: asyncpg.Connection) -> dict[str, int] | None:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, 0)", HOUSEKEEPING_LOCK):
                return None
            deleted: dict[str, int] = {}
            room = batch_rows
            for name, sql, args in targets:
                deleted[name] = _status_count(await conn.execute(sql, *args, room))
                room -= deleted[name]
                if room <= 0:
                    break
            return deleted

        totals = dict.fromkeys((name for name, _, _ in targets), 0)
        more = True
        for _ in range(max_batches):
            deleted = await self._run("housekeeping", batch)
            if deleted is None:  # another process is at it
                more = False
                break
            for name, count in deleted.items():
                totals[name] += count
            if sum(deleted.values()) < batch_rows:
                more = False
                break
        return Housekeeping(**totals, more=more)

    # -- token usage -----------------------------------------------------------------------

    async def record_usage(self, usage: UsageRecord) -> None:
        """Add one Gemini call's tokens on its own (where no transaction finishes an item)."""

        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(_ADD_USAGE_SQL, *usage.row())

        await self._run("record_usage", body)

    async def usage_by_owner(self, day: int) -> tuple[dict[int, int], dict[int, int]]:
        """Tokens counted against quotas on UTC ``day``: ``({user_id: n}, {guild_id: n})``."""

        async def body(conn: asyncpg.Connection) -> tuple[dict[int, int], dict[int, int]]:
            by_user, by_guild = (
                f"SELECT {column}, SUM({COUNTED_SQL}) FROM token_usage WHERE day = $1 GROUP BY {column}"
                for column in ("user_id", "guild_id")
            )
            users = await conn.fetch(by_user, day)
            guilds = await conn.fetch(by_guild, day)
            return {int(u): int(n) for u, n in users}, {int(g): int(n) for g, n in guilds}

        return await self._run("usage_by_owner", body, write=False)

    async def usage_totals(
        self, first_day: int, last_day: int, *, user_id: int | None = None, guild_id: int | None = None
    ) -> UsageTotals:
        """Usage from ``first_day`` to ``last_day`` of one user, one guild, both, or the bot."""
        where, args = self._usage_filter(first_day, last_day, user_id, guild_id)

        async def body(conn: asyncpg.Connection) -> UsageTotals:
            row = await conn.fetchrow(f"SELECT {SUM_USAGE_SQL} FROM token_usage WHERE {where}", *args)
            return totals_from_row(row)

        return await self._run("usage_totals", body, write=False)

    async def usage_by_model(
        self, first_day: int, last_day: int, *, user_id: int | None = None, guild_id: int | None = None
    ) -> dict[str, UsageTotals]:
        """``usage_totals`` per model, most tokens first."""
        where, args = self._usage_filter(first_day, last_day, user_id, guild_id)

        async def body(conn: asyncpg.Connection) -> dict[str, UsageTotals]:
            rows = await conn.fetch(
                f"SELECT {SUM_USAGE_SQL}, model FROM token_usage WHERE {where} GROUP BY model "
                f"ORDER BY SUM({COUNTED_SQL}) DESC, model",
                *args,
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
        """The ``limit`` users or guilds that used the most tokens from ``first_day`` to ``last_day``."""
        if by not in ("user", "guild"):
            raise ValueError(f"by must be 'user' or 'guild', not {by!r}")
        column = f"{by}_id"
        where, args = self._usage_filter(first_day, last_day, None, guild_id)

        async def body(conn: asyncpg.Connection) -> list[UsageRow]:
            rows = await conn.fetch(
                f"SELECT {SUM_USAGE_SQL}, {column} FROM token_usage WHERE {where} GROUP BY {column} "
                f"ORDER BY SUM({COUNTED_SQL}) DESC, {column} LIMIT ${len(args) + 1}",
                *args, limit,
            )
            return [UsageRow(int(r[5]), totals_from_row(r)) for r in rows]

        return await self._run("usage_top", body, write=False)

    @staticmethod
    def _usage_filter(
        first_day: int, last_day: int, user_id: int | None, guild_id: int | None
    ) -> tuple[str, tuple[int, ...]]:
        terms, args = ["day BETWEEN $1 AND $2"], [first_day, last_day]
        if user_id is not None:
            args.append(user_id)
            terms.append(f"user_id = ${len(args)}")
        if guild_id is not None:
            args.append(guild_id)
            terms.append(f"guild_id = ${len(args)}")
        return " AND ".join(terms), tuple(args)

    # -- events ----------------------------------------------------------------------------

    async def record_event(self, kind: str, data: dict[str, Any], *, now: float | None = None) -> None:
        """Append an event and keep only the newest ``events_max``."""
        stamp = self._now(now)
        encoded = json.dumps(data, separators=(",", ":"), default=str)

        async def body(conn: asyncpg.Connection) -> None:
            new_id = await conn.fetchval(
                "INSERT INTO events (kind, data, created_at) VALUES ($1, $2, $3) RETURNING id",
                _clean(kind), encoded, stamp,
            )
            await conn.execute("DELETE FROM events WHERE id <= $1", new_id - self.events_max)

        await self._run("record_event", body)

    async def recent_events(self, kind: str | None = None, limit: int = 50) -> builtins.list[Event]:
        """The newest events first, optionally of one kind."""

        async def body(conn: asyncpg.Connection) -> list[Event]:
            if kind is None:
                rows = await conn.fetch(
                    "SELECT id, kind, data, created_at FROM events ORDER BY id DESC LIMIT $1", limit
                )
            else:
                rows = await conn.fetch(
                    "SELECT id, kind, data, created_at FROM events WHERE kind = $1 ORDER BY id DESC LIMIT $2",
                    kind, limit,
                )
            return [Event(int(r[0]), r[1], json.loads(r[2]), r[3]) for r in rows]

        return await self._run("recent_events", body, write=False)

    # -- incidents, availability, alerts ---------------------------------------------------------

    async def save_incident(self, incident: IncidentRecord) -> int:
        """Insert ``incident`` (``id`` None) or update the row ``incident.id``; return its id. Only
        the newest ``INCIDENTS_MAX`` rows are kept."""
        fields = (
            _clean(incident.kind), _clean(incident.dependency), _clean(incident.cause), incident.started_at,
            incident.ended_at, incident.settled_at, incident.queued, incident.answered_after,
            incident.dead_lettered, _clean(incident.note),
        )

        async def body(conn: asyncpg.Connection) -> int:
            if incident.id is None:
                new_id = await conn.fetchval(
                    "INSERT INTO incidents (kind, dependency, cause, started_at, ended_at, settled_at, "
                    "queued, answered_after, dead_lettered, note, process_id) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
                    *fields, self._process_id,
                )
                await conn.execute("DELETE FROM incidents WHERE id <= $1", new_id - INCIDENTS_MAX)
                return int(new_id)
            await conn.execute(
                "UPDATE incidents SET kind = $1, dependency = $2, cause = $3, started_at = $4, "
                "ended_at = $5, settled_at = $6, queued = $7, answered_after = $8, dead_lettered = $9, "
                "note = $10 WHERE id = $11",
                *fields, incident.id,
            )
            return incident.id

        return await self._run("save_incident", body)

    async def incidents(
        self, *, limit: int = 50, since: float | None = None
    ) -> builtins.list[IncidentRecord]:
        """Incidents newest first, at most ``limit``, optionally only those started at or after ``since``."""

        async def body(conn: asyncpg.Connection) -> list[IncidentRecord]:
            rows = await conn.fetch(
                "SELECT kind, dependency, cause, started_at, ended_at, settled_at, queued, answered_after, "
                "dead_lettered, note, id FROM incidents WHERE started_at >= $1 "
                "ORDER BY started_at DESC, id DESC LIMIT $2",
                -math.inf if since is None else since, limit,
            )
            return [
                IncidentRecord(
                    kind=r[0], dependency=r[1], cause=r[2], started_at=r[3], ended_at=r[4], settled_at=r[5],
                    queued=r[6], answered_after=r[7], dead_lettered=r[8], note=r[9], id=int(r[10]),
                )
                for r in rows
            ]

        return await self._run("incidents", body, write=False)

    async def close_open_incidents(self, *, now: float, note: str) -> int:
        """End (and settle) every incident still open whose process is gone; return how many.

        Each incident names the process that opened it: those of live processes (this one too)
        stay open, theirs to close.
        """

        async def body(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "UPDATE incidents SET ended_at = COALESCE(ended_at, $1), settled_at = $1, "
                "note = COALESCE(note, $2) WHERE settled_at IS NULL AND (process_id IS NULL OR "
                f"(process_id % {_LOCK_KEY}) NOT IN ({_ALIVE_SQL}))",
                now, _clean(note),
            )
            return _status_count(status)

        return await self._run("close_open_incidents", body)

    async def availability(self, *, now: float, days: int = 7) -> builtins.list[AvailabilityDay]:
        """The last ``days`` UTC days with messages accepted, from the triggers' counts (see
        ``SqliteStore.availability``)."""
        today = int(now // DAY)
        first = today - days + 1
        young = now - AVAILABILITY_WITHIN

        async def body(conn: asyncpg.Connection) -> list[AvailabilityDay]:
            rows = await conn.fetch(
                "SELECT day, accepted, answered, answered_in_time FROM availability WHERE day >= $1 "
                "ORDER BY day",
                first,
            )
            pending = await conn.fetch(
                "SELECT floor(created_at / 86400)::integer AS d, COUNT(*) FROM queue "
                "WHERE state IN ('pending', 'claimed') AND created_at > $1 AND NOT notice GROUP BY d",
                young,
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

        async def body(conn: asyncpg.Connection) -> list[AlertRecord]:
            rows = await conn.fetch(
                "SELECT key, detail, since, notified_at, resolved_at FROM alerts ORDER BY key"
            )
            return [AlertRecord(*row) for row in rows]

        return await self._run("alert_states", body, write=False)

    async def save_alert_states(
        self, states: Sequence[AlertRecord], *, delete: Sequence[str] = ()
    ) -> None:
        """Write ``states`` (replacing rows of the same key) and delete the keys in ``delete``, in one
        transaction."""
        rows = [(a.key, _clean(a.detail), a.since, a.notified_at, a.resolved_at) for a in states]

        async def body(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                "INSERT INTO alerts (key, detail, since, notified_at, resolved_at) "
                "VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (key) DO UPDATE SET detail = EXCLUDED.detail, since = EXCLUDED.since, "
                "notified_at = EXCLUDED.notified_at, resolved_at = EXCLUDED.resolved_at",
                rows,
            )
            if delete:
                await conn.execute("DELETE FROM alerts WHERE key = ANY($1::text[])", list(delete))

        await self._run("save_alert_states", body)

    # -- coordination: processes, heartbeats, notifications (services.coordination) ------------

    @property
    def process_id(self) -> int | None:
        """This process's row in ``processes`` (None before start, or unregistered)."""
        return self._process_id

    def subscribe(self, kind: str, handler: Handler) -> None:
        """Call ``handler(payload)`` for every notification of ``kind`` from another process, in the
        order they were committed. ``"resync"`` is called (locally) after the session was lost and
        opened again: notifications of the gap are gone, so read the shared state again."""
        self._handlers.setdefault(kind, []).append(handler)

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        """Tell every other process (``pg_notify`` on ``CHANNEL``), committed at once."""
        text = self.notification(kind, payload)

        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, text)

        await self._run("notify", body, write=False)

    async def notify_in(self, conn: asyncpg.Connection, kind: str, payload: dict[str, Any]) -> None:
        """Tell every other process within the transaction on ``conn``: it goes out with the commit,
        and not at all if the transaction rolls back."""
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.notification(kind, payload))

    def notification(self, kind: str, payload: dict[str, Any]) -> str:
        """The NOTIFY payload for ``kind``."""
        text = json.dumps({**payload, "kind": kind, "origin": self._process_id}, separators=(",", ":"))
        if len(text.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a {kind} notification of {len(text)} bytes is over {MAX_PAYLOAD_BYTES}")
        return text

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._inbox.put_nowait(payload)

    async def _consume(self) -> None:
        """Hand notifications to their handlers one at a time, in the order they came."""
        while True:
            text = await self._inbox.get()
            try:
                message = json.loads(text)
            except ValueError:
                log.warning("storage.notification_unreadable", length=len(text))
                continue
            if not isinstance(message, dict):
                continue
            if message.get("origin") is not None and message.get("origin") == self._process_id:
                continue  # our own: applied already where it was sent
            self.notifications_received += 1
            for handler in self._handlers.get(str(message.get("kind")), ()):
                try:
                    await handler(message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("storage.notification_handler_failed", kind=message.get("kind"),
                              error=repr(exc), exc_info=exc)

    async def beat(self, state: dict[str, Any], *, now: float | None = None) -> int:
        """Record this process alive at ``now`` with ``state``; hand back the claims of processes
        that are gone (see ``release_claims``) and return how many; forget processes gone for an
        hour."""
        if self._process_id is None:
            return 0
        stamp = self._now(now)
        encoded = json.dumps(state, separators=(",", ":"), default=str)

        async def body(conn: asyncpg.Connection) -> int:
            await conn.execute(
                "UPDATE processes SET beat_at = $2, state = $3::jsonb WHERE id = $1",
                self._process_id, stamp, encoded,
            )
            released = await conn.execute(_RELEASE_GONE_SQL, CLAIM_RELEASED, stamp - GONE_AFTER_SECONDS)
            await conn.execute(
                f"DELETE FROM processes WHERE beat_at < $1 AND id <> $2 "
                f"AND (id % {_LOCK_KEY}) NOT IN ({_ALIVE_SQL})",
                stamp - PROCESS_KEEP_SECONDS, self._process_id,
            )
            return _status_count(released)

        return await self._run("beat", body)

    async def processes(self) -> list[ProcessRecord]:
        """Every process of the last hour (alive, stopped or dead), oldest first."""

        async def body(conn: asyncpg.Connection) -> list[ProcessRecord]:
            rows = await conn.fetch(
                f"SELECT id, name, started_at, beat_at, stopped_at, state::text, "
                f"(id % {_LOCK_KEY}) IN ({_ALIVE_SQL}) FROM processes ORDER BY id"
            )
            return [
                ProcessRecord(int(r[0]), r[1], r[2], r[3], r[4], bool(r[6]), int(r[0]) == self._process_id,
                              json.loads(r[5]))
                for r in rows
            ]

        return await self._run("processes", body, write=False)

    # -- operators (last: the method name shadows the builtin in the class body) --------

    async def recent_inbound(self, since: float, limit: int) -> builtins.list[dict[str, Any]]:
        """The payloads of user messages accepted since ``since`` (any state), newest first: where
        a restarted shard looks for what its predecessor may have missed (bot.catchup)."""

        async def body(conn: asyncpg.Connection) -> builtins.list[dict[str, Any]]:
            rows = await conn.fetch(
                "SELECT payload FROM queue WHERE kind = 'inbound' AND created_at >= $1 "
                "ORDER BY id DESC LIMIT $2",
                since, limit,
            )
            return [json.loads(r[0]) for r in rows]

        return await self._run("recent_inbound", body, write=False)

    async def list(self, state: ItemState | None = None, limit: int = 50) -> builtins.list[QueueItem]:
        """Items oldest first, optionally of one state (for operators)."""

        async def body(conn: asyncpg.Connection) -> builtins.list[QueueItem]:
            if state is None:
                rows = await conn.fetch(f"SELECT {_QUEUE_COLUMNS} FROM queue ORDER BY id LIMIT $1", limit)
            else:
                rows = await conn.fetch(
                    f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE state = $1 ORDER BY id LIMIT $2",
                    ItemState(state).value, limit,
                )
            return [item_from_row(r) for r in rows]

        return await self._run("list", body, write=False)

    # -- reminders (plugins/remind.py) -------------------------------------------------------

    async def add_reminder(
        self, *, user_id: int, channel_id: int, guild_id: int | None, source_id: int, text: str,
        due_at: float, now: float | None = None,
    ) -> Reminder:
        """Store a reminder; ``TooManyRemindersError`` past ``REMINDERS_PER_USER`` pending ones."""
        stamp = self._now(now)

        async def body(conn: asyncpg.Connection) -> Reminder | TooManyRemindersError:
            # One user's concurrent adds cannot both slip under the cap.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('reminders'), $1::int)", user_id % 2**31
            )
            count = await conn.fetchval(
                "SELECT COUNT(*) FROM reminders WHERE user_id = $1 AND fired_at IS NULL", user_id
            )
            if count >= REMINDERS_PER_USER:
                return TooManyRemindersError(user_id)
            new_id = await conn.fetchval(
                "INSERT INTO reminders (user_id, channel_id, guild_id, source_id, text, due_at, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                user_id, channel_id, guild_id, source_id, _clean(text), due_at, stamp,
            )
            return Reminder(int(new_id), user_id, channel_id, guild_id, source_id, text, due_at, stamp)

        added = await self._run("add_reminder", body)
        if isinstance(added, TooManyRemindersError):
            raise added
        return added

    async def due_reminders(self, *, now: float, limit: int = 50) -> builtins.list[Reminder]:
        """Reminders not yet fired whose time has come, the earliest first."""

        async def body(conn: asyncpg.Connection) -> list[Reminder]:
            rows = await conn.fetch(
                f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE fired_at IS NULL AND due_at <= $1"
                " ORDER BY due_at, id LIMIT $2",
                now, limit,
            )
            return [reminder_from_row(r) for r in rows]

        return await self._run("due_reminders", body, write=False)

    async def next_reminder_at(self) -> float | None:
        """When the earliest reminder not yet fired is due (None: none)."""

        async def body(conn: asyncpg.Connection) -> float | None:
            value = await conn.fetchval("SELECT MIN(due_at) FROM reminders WHERE fired_at IS NULL")
            return None if value is None else float(value)

        return await self._run("next_reminder_at", body, write=False)

    async def user_reminders(self, user_id: int) -> builtins.list[Reminder]:
        """A user's reminders not yet fired, the earliest first."""

        async def body(conn: asyncpg.Connection) -> list[Reminder]:
            rows = await conn.fetch(
                f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE user_id = $1 AND fired_at IS NULL"
                " ORDER BY due_at, id",
                user_id,
            )
            return [reminder_from_row(r) for r in rows]

        return await self._run("user_reminders", body, write=False)

    async def cancel_reminder(self, reminder_id: int, user_id: int) -> bool:
        """Delete one of ``user_id``'s reminders not yet fired; False if there is none such."""

        async def body(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "DELETE FROM reminders WHERE id = $1 AND user_id = $2 AND fired_at IS NULL",
                reminder_id, user_id,
            )
            return str(status).endswith(" 1")

        return await self._run("cancel_reminder", body)

    async def reminder_fired(self, reminder_id: int, *, now: float | None = None) -> None:
        """Mark a reminder fired (its delivery is in the queue); fired rows are deleted after a day."""
        stamp = self._now(now)

        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE reminders SET fired_at = $1 WHERE id = $2 AND fired_at IS NULL", stamp, reminder_id
            )
            await conn.execute("DELETE FROM reminders WHERE fired_at < $1", stamp - DAY)

        await self._run("reminder_fired", body)
