"""Storage benchmark: the queue and history on SQLite and on PostgreSQL, and the JSON DataStore.

``python -m bench.bench_storage [--quick] [--json]``. Every figure is measured on real files in
a temporary directory on the same disk as the default temp dir, one operation at a time (the
bot's drain and pipeline do not batch), so latency includes the commit's fsync. The queue rows
are given for ``synchronous=FULL`` (the store's default: survives power loss) and ``NORMAL``
(survives ``kill -9`` only) so the durability choice has a price tag.

PostgreSQL rows beside them: the server of ``BENCH_DATABASE_URL`` (an empty database: the bench
creates its tables and leaves rows behind), else a throwaway local server started in a temp dir
with PostgreSQL's durable defaults (fsync and synchronous commit on, like a production server) from
Debian's binaries (``tests/pg.py``), over loopback TCP; without either the PostgreSQL rows are left
out with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from resilience.degradation import ItemKind, QueueCaps
from services.pg_storage import PostgresStore
from services.storage import HOUSEKEEPING_BATCH_ROWS, SqliteStore
from tests.pg import durable_server

Store = SqliteStore | PostgresStore
OpenStore = Callable[[str], Store]
"""A fresh store for one measurement (named: a file, or a database emptied for it)."""


def _percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99 in milliseconds."""
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99)}


async def _timed(n: int, op: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        samples.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    return {"ops_per_s": round(n / total, 1), **_percentiles(samples), "n": n}


async def _queue(open_store: OpenStore, name: str, n: int) -> dict[str, Any]:
    now = 1_700_000_000.0
    async with open_store(name) as store:
        enqueue = await _timed(
            n,
            lambda i: store.enqueue(
                ItemKind.INBOUND, f"c{i}", {"text": "x" * 200, "i": i}, now=now, dedup_key=f"m{i}"
            ),
        )

        async def claim_complete(_: int) -> None:
            (item,) = await store.claim(now=now, lease_seconds=60, limit=1)
            await store.complete(item.id)

        drain = await _timed(n, claim_complete)
    return {"enqueue": enqueue, "claim_complete": drain}


# The caps are checked in acceptance's transaction: the bot's per-user and per-guild defaults, and a
# total cap above the backlog so that every live item is counted (a count stops at its cap).
CAPS = QueueCaps(max_items=1_000_000, max_pending_per_user=5, max_pending_per_guild=50)


async def _accept(open_store: OpenStore, n: int, backlog: int, caps: QueueCaps | None) -> dict[str, Any]:
    """``accept_with_history``, the live message's one transaction, behind ``backlog`` live items."""
    now = 1_700_000_000.0
    name = f"accept_{backlog}_{'caps' if caps else 'nocaps'}"
    async with open_store(name) as store:
        # A queue during an outage: pending items of many users (4 each) and guilds (40 each), just
        # under the caps, and each measured message comes from one of them.
        users, guilds = max(1, backlog // 4), max(1, backlog // 40)
        for i in range(backlog):
            payload = {"author_id": 1_000_000 + i // 4, "guild_id": 100 + i // 40, "content": "x" * 200}
            await store.accept(
                f"b{i}", ItemKind.INBOUND, f"b{i % 100}", payload, now=now, lease_seconds=60, claim=False
            )

        if isinstance(store, PostgresStore) and backlog:
            # The statistics autovacuum gathers within a minute of such a backlog building up.
            await store.transaction("analyze", lambda conn: conn.execute("ANALYZE queue"))

        def accept(i: int) -> Awaitable[Any]:
            payload = {"author_id": 1_000_000 + i % users, "guild_id": 100 + i % guilds, "content": "x" * 200}
            return store.accept_with_history(
                f"m{i}", ItemKind.INBOUND, f"c{i}", payload, now=now, lease_seconds=60, caps=caps
            )

        return {**await _timed(n, accept), "backlog": backlog, "caps": caps is not None}


async def _housekeeping(open_store: OpenStore, rows: int) -> dict[str, Any]:
    """One housekeeping transaction of the default bound of rows: how long it holds the write lock."""
    now = 1_700_000_000.0
    async with open_store("housekeeping") as store:
        for i in range(rows):  # dead-lettered messages of 4,000 characters and old turns
            item = await store.enqueue(ItemKind.INBOUND, f"c{i}", {"content": "x" * 4000}, now=now)
            await store.dead_letter(item.id, "gave up", now=now)
        for i in range(0, rows, 2):
            await store.append_turns(f"t{i}", [("user", "q" * 1000, i), ("model", "a" * 1000, None)], now=now)
        later = now + 400 * 86400.0
        timed = await _timed(
            rows * 2 // HOUSEKEEPING_BATCH_ROWS,
            lambda _: store.housekeeping(
                now=later, queue_retention=0, history_retention=0, processed_retention=0, max_batches=1
            ),
        )
        assert not (
            await store.housekeeping(now=later, queue_retention=0, history_retention=0, processed_retention=0)
        ).total, "rows left over"
    return {**timed, "rows_per_batch": HOUSEKEEPING_BATCH_ROWS}


async def _history(open_store: OpenStore, n: int) -> dict[str, Any]:
    async with open_store("history") as store:
        text = "a sentence of a typical chat message, " * 10
        append = await _timed(n, lambda i: store.append_turn(f"c{i % 10}", "user", text, now=float(i)))
        read = await _timed(n, lambda i: store.history(f"c{i % 10}"))
    return {"append": append, "read": read}


def _guild_settings(target_bytes: int) -> dict[str, Any]:
    guilds: dict[str, Any] = {}
    i = 0
    while len(json.dumps({"guilds": guilds})) < target_bytes:
        gid = str(100_000_000_000_000_000 + i)
        guilds[gid] = {
            "chat_channels": [200_000_000_000_000_000 + i * 10 + k for k in range(3)],
            "persona": f"a helpful assistant for guild {i}",
            "user_rate_per_minute": 5,
        }
        i += 1
    return {"guilds": guilds}


def _datastore(directory: Path, saves: int, recoveries: int) -> dict[str, Any]:
    import structlog

    from services.datastore import DataStore

    # A logger that returns instead of printing: the recovery warnings would break --json.
    store = DataStore(directory / "data", logger=structlog.wrap_logger(structlog.ReturnLogger()))
    data = _guild_settings(100_000)
    size = len(json.dumps(data))
    store.load("guild_settings")
    samples = []
    for i in range(saves):
        data["guilds"][next(iter(data["guilds"]))]["user_rate_per_minute"] = i
        t = time.perf_counter()
        store.save("guild_settings", data)
        samples.append(time.perf_counter() - t)
    recover_samples = []
    sources = set()
    for _ in range(recoveries):
        store.path("guild_settings").write_bytes(b'{"guilds": {"1": ')  # a torn write
        t = time.perf_counter()
        report = store.recover("guild_settings")
        recover_samples.append(time.perf_counter() - t)
        sources.add(report.source)
        store.save("guild_settings", data)  # put a good file back for the next round
    return {
        "state_bytes": size,
        "save": {**_percentiles(samples), "n": saves},
        "recover_corrupt": {**_percentiles(recover_samples), "n": recoveries, "sources": sorted(sources)},
    }


def _sqlite(directory: Path, synchronous: str) -> OpenStore:
    def open_store(name: str) -> SqliteStore:
        return SqliteStore(directory / f"{name}_{synchronous}.sqlite3", synchronous=synchronous)

    return open_store


@contextlib.contextmanager
def _postgres_server() -> Iterator[str | None]:
    """The URL of an empty PostgreSQL database to measure on, or None (see the module docstring)."""
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        yield url
        return
    with durable_server() as server:
        yield None if server is None else server.new_database(migrated=False)


@contextlib.asynccontextmanager
async def _postgres(url: str) -> AsyncIterator[OpenStore]:
    """Stores on ``url``, each measurement on emptied tables (as a fresh SQLite file would be)."""
    async with PostgresStore(url, register=False):  # the schema
        pass
    admin = await asyncpg.connect(url)

    def open_store(name: str) -> PostgresStore:
        return _Fresh(url, admin)

    try:
        yield open_store
    finally:
        await admin.close()


class _Fresh(PostgresStore):
    """A store whose start empties the bench's tables first."""

    def __init__(self, url: str, admin: asyncpg.Connection) -> None:
        super().__init__(url, register=False, statement_timeout=30.0)
        self._admin = admin

    async def start(self) -> None:
        await self._admin.execute(
            "TRUNCATE queue, turns, processed, events, availability, token_usage, attachment_refs "
            "RESTART IDENTITY"
        )
        await super().start()


async def _backend(open_store: OpenStore, quick: bool, *, normal: OpenStore | None = None) -> dict[str, Any]:
    """The queue, history, acceptance and housekeeping figures of one backend. ``normal``: SQLite's
    ``synchronous=NORMAL`` stores, which the bot uses, beside the FULL default ``open_store``."""
    n = 100 if quick else 400
    backlog = 2_000 if quick else 10_000
    bot = normal or open_store
    result: dict[str, Any] = {"queue": await _queue(open_store, "queue", n)}
    if normal is not None:
        result["queue_normal"] = await _queue(normal, "queue", n)
    result.update(
        {
            "history": await _history(open_store, n),
            "housekeeping": await _housekeeping(bot, 2_000 if quick else 10_000),
            "accept_empty": await _accept(bot, n, 0, None),
            "accept_empty_caps": await _accept(bot, n, 0, CAPS),
            "accept_backlog": await _accept(bot, n, backlog, None),
            "accept_backlog_caps": await _accept(bot, n, backlog, CAPS),
        }
    )
    return result


async def _run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        directory = Path(tmp)
        sqlite = await _backend(
            _sqlite(directory, "FULL"), quick, normal=_sqlite(directory, "NORMAL")
        )
        result: dict[str, Any] = {
            "queue_full": sqlite["queue"],
            "queue_normal": sqlite["queue_normal"],
            **{k: v for k, v in sqlite.items() if k not in ("queue", "queue_normal")},
        }
        with _postgres_server() as url:
            if url is None:
                missing = "no PostgreSQL: set BENCH_DATABASE_URL or install postgresql-15"
                result["postgres"] = {"skipped": missing}
            else:
                async with _postgres(url) as open_postgres:
                    result["postgres"] = await _backend(open_postgres, quick)
        try:
            result["datastore"] = await asyncio.to_thread(
                _datastore, directory, 20 if quick else 60, 5 if quick else 20
            )
        except ImportError as exc:  # engineer G's module missing: leave those rows out
            result["datastore"] = {"skipped": str(exc)}
    result["summary"] = _summary(result)
    return result


def _summary(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: float, unit: str, target: str = "") -> None:
        rows.append({"figure": figure, "value": value, "unit": unit, "target": target, "baseline": ""})

    for mode in ("full", "normal"):
        q = r[f"queue_{mode}"]
        add(f"queue enqueue throughput ({mode.upper()})", q["enqueue"]["ops_per_s"], "ops/s")
        add(f"queue enqueue p50 ({mode.upper()})", q["enqueue"]["p50_ms"], "ms")
        add(f"queue enqueue p99 ({mode.upper()})", q["enqueue"]["p99_ms"], "ms")
        add(f"queue claim+complete throughput ({mode.upper()})", q["claim_complete"]["ops_per_s"], "items/s")
        add(f"queue claim+complete p50 ({mode.upper()})", q["claim_complete"]["p50_ms"], "ms")
        add(f"queue claim+complete p99 ({mode.upper()})", q["claim_complete"]["p99_ms"], "ms")
    for name in ("accept_empty", "accept_empty_caps", "accept_backlog", "accept_backlog_caps"):
        label = f"{r[name]['backlog']:,} live items{', caps' if r[name]['caps'] else ''}"
        add(f"accept_with_history p50 (NORMAL, {label})", r[name]["p50_ms"], "ms")
        add(f"accept_with_history p99 (NORMAL, {label})", r[name]["p99_ms"], "ms")
    k = r["housekeeping"]
    add(f"housekeeping transaction, {k['rows_per_batch']} rows, p50", k["p50_ms"], "ms")
    add(f"housekeeping transaction, {k['rows_per_batch']} rows, p99", k["p99_ms"], "ms")
    h = r["history"]
    add("history append p50", h["append"]["p50_ms"], "ms")
    add("history append p99", h["append"]["p99_ms"], "ms")
    add("history read p50", h["read"]["p50_ms"], "ms")
    add("history read p99", h["read"]["p99_ms"], "ms")
    p = r["postgres"]
    if "queue" in p:
        q = p["queue"]
        add("PostgreSQL queue enqueue throughput", q["enqueue"]["ops_per_s"], "ops/s")
        add("PostgreSQL queue enqueue p50", q["enqueue"]["p50_ms"], "ms")
        add("PostgreSQL queue enqueue p99", q["enqueue"]["p99_ms"], "ms")
        add("PostgreSQL queue claim+complete throughput", q["claim_complete"]["ops_per_s"], "items/s")
        add("PostgreSQL queue claim+complete p50", q["claim_complete"]["p50_ms"], "ms")
        add("PostgreSQL queue claim+complete p99", q["claim_complete"]["p99_ms"], "ms")
        for name in ("accept_empty", "accept_empty_caps", "accept_backlog", "accept_backlog_caps"):
            label = f"{p[name]['backlog']:,} live items{', caps' if p[name]['caps'] else ''}"
            add(f"PostgreSQL accept_with_history p50 ({label})", p[name]["p50_ms"], "ms")
            add(f"PostgreSQL accept_with_history p99 ({label})", p[name]["p99_ms"], "ms")
        k = p["housekeeping"]
        add(f"PostgreSQL housekeeping transaction, {k['rows_per_batch']} rows, p50", k["p50_ms"], "ms")
        h = p["history"]
        add("PostgreSQL history append p50", h["append"]["p50_ms"], "ms")
        add("PostgreSQL history append p99", h["append"]["p99_ms"], "ms")
        add("PostgreSQL history read p50", h["read"]["p50_ms"], "ms")
        add("PostgreSQL history read p99", h["read"]["p99_ms"], "ms")
    d = r["datastore"]
    if "save" in d:
        add(f"datastore save p50 ({d['state_bytes'] // 1000} KB)", d["save"]["p50_ms"], "ms")
        add(f"datastore save p99 ({d['state_bytes'] // 1000} KB)", d["save"]["p99_ms"], "ms")
        add("datastore recover corrupt file p50", d["recover_corrupt"]["p50_ms"], "ms")
        add("datastore recover corrupt file p99", d["recover_corrupt"]["p99_ms"], "ms")
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    """Run every measurement and return the figures (``summary`` holds the table rows)."""
    return asyncio.run(_run(quick))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_storage", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    rows = result["summary"]
    width = max(len(row["figure"]) for row in rows)
    print(f"{'figure'.ljust(width)}  {'value':>10}  unit")
    for row in rows:
        print(f"{row['figure'].ljust(width)}  {row['value']:>10,.3f}  {row['unit']}")
    if "skipped" in result["datastore"]:
        print(f"datastore rows left out: {result['datastore']['skipped']}")
    if "skipped" in result["postgres"]:
        print(f"PostgreSQL rows left out: {result['postgres']['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
