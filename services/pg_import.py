"""Copy a SQLite store (and the JSON DataStore beside it) into PostgreSQL, once.

``import_sqlite(sqlite_path, database_url, data_dir=..., dry_run=...)`` is what
``python -m bot storage migrate-sqlite-to-postgres`` runs when a single-process bot moves to
PostgreSQL. In one PostgreSQL transaction it copies the queue (a claimed item comes over pending
and marked released, as ``release_claims`` would at start-up), the conversation history and the
files it refers to, the processed message ids, the token usage and the availability counts, and the
JSON documents (maintenance, guild settings, admins, breaker overrides) where the database still
has their defaults. The dry run does all of it and rolls back.

Idempotent: every copied row is recorded in ``sqlite_imports`` by its source table and key, so a
second run copies nothing again, even rows that the bot on PostgreSQL has since answered and
deleted. Items get new ids in their source order, so each conversation keeps its order; copy before
the first start on PostgreSQL, or a conversation that has items on both sides puts the copied ones
behind. Events, incidents and alert states are not copied (they describe the old process).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from services.datastore import DataStore
from services.pg_storage import PostgresStore, as_storage_error, describe_url
from services.storage import CLAIM_RELEASED, SqliteStore

BATCH = 500


@dataclass
class TableCount:
    """Rows of one source table: ``copied`` now (or, in a dry run, that would be), ``already``
    copied by an earlier run or present on PostgreSQL already."""

    copied: int = 0
    already: int = 0


@dataclass
class ImportReport:
    """What one run copied, per table, in the order they are copied."""

    source: Path
    target: str
    dry_run: bool
    tables: dict[str, TableCount] = field(default_factory=dict)

    @property
    def copied(self) -> int:
        return sum(t.copied for t in self.tables.values())


def _rows(db: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.execute(sql).fetchall()]


def _owner(payload: Any, key: str) -> int | None:
    value = payload.get(key) if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _clean(text: str | None) -> str | None:
    return None if text is None else text.replace("\x00", "\ufffd")


async def import_sqlite(
    sqlite_path: Path, database_url: str, *, data_dir: Path | None = None, dry_run: bool = False,
    now: float,
) -> ImportReport:
    """Copy ``sqlite_path`` (brought to the current SQLite schema first) and the JSON documents of
    ``data_dir`` into the database at ``database_url`` (migrated first); see the module docstring.

    The caller holds the data directory (no bot writes the SQLite file meanwhile).
    """
    async with SqliteStore(sqlite_path):  # the schema the queries below read
        pass
    async with PostgresStore(database_url, register=False):  # the schema they write
        pass
    report = ImportReport(sqlite_path, describe_url(database_url), dry_run)
    try:
        await _import(sqlite_path, database_url, data_dir, dry_run, now, report)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise as_storage_error(exc) from exc
    return report


async def _import(
    sqlite_path: Path,
    database_url: str,
    data_dir: Path | None,
    dry_run: bool,
    now: float,
    report: ImportReport,
) -> None:
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    conn = await asyncpg.connect(database_url)
    try:
        source.execute("BEGIN")  # one snapshot of the source
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("SET LOCAL bot.importing = 'on'")  # the availability triggers count nothing
            importer = _Importer(source, conn, report, now)
            await importer.queue()
            await importer.turns()
            await importer.attachment_refs()
            await importer.processed()
            await importer.token_usage()
            await importer.availability()
            if data_dir is not None:
                await importer.shared_state(data_dir)
        except BaseException:
            await tx.rollback()
            raise
        if dry_run:
            await tx.rollback()
        else:
            await tx.commit()
    finally:
        source.close()
        await conn.close()


class _Importer:
    def __init__(
        self, source: sqlite3.Connection, conn: asyncpg.Connection, report: ImportReport, now: float
    ) -> None:
        self.source = source
        self.conn = conn
        self.report = report
        self.now = now

    async def _done(self, table: str) -> set[str]:
        rows = await self.conn.fetch("SELECT source_key FROM sqlite_imports WHERE source_table = $1", table)
        return {r[0] for r in rows}

    async def _record(self, table: str, keys: Sequence[str]) -> None:
        await self.conn.executemany(
            "INSERT INTO sqlite_imports (source_table, source_key, imported_at) VALUES ($1, $2, $3)",
            [(table, key, self.now) for key in keys],
        )

    async def _copy(self, table: str, keyed: list[tuple[str, tuple[Any, ...]]], sql: str) -> None:
        """Insert the rows not copied before (by source key), in order, and record their keys."""
        done = await self._done(table)
        count = self.report.tables.setdefault(table, TableCount())
        fresh = [(key, row) for key, row in keyed if key not in done]
        count.already += len(keyed) - len(fresh)
        for start in range(0, len(fresh), BATCH):
            batch = fresh[start : start + BATCH]
            await self.conn.executemany(sql, [row for _, row in batch])
            await self._record(table, [key for key, _ in batch])
            count.copied += len(batch)

    async def queue(self) -> None:
        rows = await self.conn.fetch("SELECT dedup_key FROM queue WHERE dedup_key IS NOT NULL")
        live = {r[0] for r in rows}
        keyed = []
        skipped = 0
        source = _rows(
            self.source,
            "SELECT id, kind, conversation_key, payload, state, attempts, created_at, next_attempt_at, "
            "last_error, dedup_key, finished_at FROM queue ORDER BY id",
        )
        for row in source:
            item_id, kind, key, payload, state, attempts, created, next_at, last_error, dedup, finished = row
            if dedup is not None and dedup in live:
                skipped += 1  # the same message is queued on PostgreSQL already: never twice
                continue
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = None
            if state == "claimed":  # its process is stopped: released, as at a start-up
                state, last_error = "pending", CLAIM_RELEASED
            notice = isinstance(parsed, dict) and parsed.get("notice") is not None
            keyed.append((
                str(item_id),
                (kind, key, payload, _owner(parsed, "author_id"), _owner(parsed, "guild_id"), notice,
                 state, attempts, created, next_at, _clean(last_error), dedup, finished),
            ))
        await self._copy(
            "queue",
            keyed,
            "INSERT INTO queue (kind, conversation_key, payload, author_id, guild_id, notice, state, "
            "attempts, created_at, next_attempt_at, last_error, dedup_key, finished_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
            "ON CONFLICT (dedup_key) DO NOTHING",
        )
        self.report.tables["queue"].already += skipped

    async def turns(self) -> None:
        rows = _rows(
            self.source,
            "SELECT id, conversation_key, role, text, message_id, created_at FROM turns ORDER BY id",
        )
        await self._copy(
            "turns",
            [(str(r[0]), (r[1], r[2], _clean(r[3]), _clean(r[4]), r[5])) for r in rows],
            "INSERT INTO turns (conversation_key, role, text, message_id, created_at) "
            "VALUES ($1, $2, $3, $4, $5)",
        )

    async def attachment_refs(self) -> None:
        rows = _rows(
            self.source,
            "SELECT id, conversation_key, message_id, data, created_at FROM attachment_refs ORDER BY id",
        )
        await self._copy(
            "attachment_refs",
            [(str(r[0]), (r[1], r[2], r[3], r[4])) for r in rows],
            "INSERT INTO attachment_refs (conversation_key, message_id, data, created_at) "
            "VALUES ($1, $2, $3, $4)",
        )

    async def processed(self) -> None:
        rows = _rows(self.source, "SELECT message_id, processed_at FROM processed ORDER BY processed_at")
        await self._copy(
            "processed",
            [(str(r[0]), (str(r[0]), r[1])) for r in rows],
            "INSERT INTO processed (message_id, processed_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )

    async def token_usage(self) -> None:
        rows = _rows(
            self.source,
            "SELECT day, user_id, guild_id, model, calls, prompt_tokens, output_tokens, thought_tokens, "
            "cached_tokens FROM token_usage ORDER BY day, user_id, guild_id, model",
        )
        # Added to what the bot on PostgreSQL counted for the same day, user, guild and model.
        await self._copy(
            "token_usage",
            [(f"{r[0]}:{r[1]}:{r[2]}:{r[3]}", r) for r in rows],
            "INSERT INTO token_usage (day, user_id, guild_id, model, calls, prompt_tokens, output_tokens, "
            "thought_tokens, cached_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (day, user_id, guild_id, model) DO UPDATE SET "
            "calls = token_usage.calls + EXCLUDED.calls, "
            "prompt_tokens = token_usage.prompt_tokens + EXCLUDED.prompt_tokens, "
            "output_tokens = token_usage.output_tokens + EXCLUDED.output_tokens, "
            "thought_tokens = token_usage.thought_tokens + EXCLUDED.thought_tokens, "
            "cached_tokens = token_usage.cached_tokens + EXCLUDED.cached_tokens",
        )

    async def availability(self) -> None:
        rows = _rows(
            self.source, "SELECT day, accepted, answered, answered_in_time FROM availability ORDER BY day"
        )
        await self._copy(
            "availability",
            [(str(r[0]), r) for r in rows],
            "INSERT INTO availability (day, accepted, answered, answered_in_time) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (day) DO UPDATE SET accepted = availability.accepted + EXCLUDED.accepted, "
            "answered = availability.answered + EXCLUDED.answered, "
            "answered_in_time = availability.answered_in_time + EXCLUDED.answered_in_time",
        )

    async def shared_state(self, data_dir: Path) -> None:
        """The JSON documents, each where the database still holds its first version (the defaults
        the bot wrote at its first start, or nothing): a state already changed on PostgreSQL wins."""
        files = DataStore(data_dir)
        done = await self._done("shared_state")
        count = self.report.tables.setdefault("shared_state", TableCount())
        for name in files.names():
            if not files.path(name).exists() or name in done:
                count.already += name in done
                continue
            data = files.load(name)
            row = await self.conn.fetchrow(
                "SELECT version, data::text FROM shared_state WHERE name = $1", name
            )
            if row is not None and (row[0] > 1 or json.loads(row[1]) == data):
                count.already += 1
                continue
            if row is not None:
                await self.conn.execute(
                    "INSERT INTO shared_state_history (name, version, data, updated_at) "
                    "SELECT name, version, data, updated_at FROM shared_state WHERE name = $1 "
                    "ON CONFLICT DO NOTHING",
                    name,
                )
            await self.conn.execute(
                "INSERT INTO shared_state (name, data, version, updated_at, updated_by) "
                "VALUES ($1, $2::jsonb, $3, $4, 'migrate-sqlite-to-postgres') ON CONFLICT (name) DO UPDATE "
                "SET data = EXCLUDED.data, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, "
                "updated_by = EXCLUDED.updated_by",
                name, json.dumps(data), 1 if row is None else row[0] + 1, self.now,
            )
            await self._record("shared_state", [name])
            count.copied += 1
