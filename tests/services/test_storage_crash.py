"""Crash safety of the durable queue: a worker process is SIGKILLed at random moments, 100+ times,
on SQLite and on PostgreSQL (there the killed process's connection drops mid-transaction and the
server must roll its transaction back).

The worker (a forked child) enqueues with dedup keys, accepts messages under queue caps, claims
and completes in a loop, runs housekeeping now and then, and appends a line to a log only after
each operation's commit has returned. After every kill the parent checks the database against
the log: it opens, ``integrity_check`` is ok (SQLite), every enqueue and acceptance the child reported is
present exactly once (or was completed and then pruned by housekeeping, never pruned while
live), every refused message left nothing behind (no item, no processed id), every reported
completion is done, no item was claimed twice under a live lease, each conversation was served
in order, and (SQLite) the kept count of live items matches the items. At the end the killed workers'
leases expire and a fresh store drains everything.

Virtual time: run ``r`` of the child works at ``now = r * RUN_SPAN + small steps`` with leases of
``LEASE`` seconds (< ``RUN_SPAN``), so a killed run's leases are live for the rest of that run
and expired for the next one, without anyone sleeping.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from resilience.degradation import ItemKind, ItemState, QueueCaps
from resilience.errors import QueueFullError
from services.pg_storage import PostgresStore
from services.storage import SqliteStore
from tests.pg import PostgresServer

KILLS = 110
RUN_SPAN = 1_000.0
LEASE = 100.0
CONVERSATIONS = 4
AUTHORS = 3
CAPS = QueueCaps(max_items=30, max_pending_per_user=1)


Rows = Callable[[str], list[tuple[Any, ...]]]


def _open(database: str) -> SqliteStore | PostgresStore:
    """The store of ``database``: a PostgreSQL URL, or a SQLite file's path."""
    if database.startswith("postgresql://"):
        return PostgresStore(database, statement_timeout=10.0)
    return SqliteStore(Path(database), statement_timeout=10.0)


def _child(database: str, log_path: str, run: int, hang_after_claim: bool = False) -> None:
    """Queue work forever (bounded), logging each operation after its commit returned."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(line: str) -> None:
        os.write(fd, (line + "\n").encode())  # one write() syscall: all or nothing under SIGKILL

    async def work() -> None:
        store = _open(database)
        await store.start()
        log(f"S {run}")
        step = 0
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and step < 50_000:
            step += 1
            now = run * RUN_SPAN + step * 0.001
            key = f"r{run}-{step}"
            item = await store.enqueue(
                ItemKind.INBOUND if step % 3 else ItemKind.OUTBOUND,
                f"conv{step % CONVERSATIONS}",
                {"key": key},
                now=now,
                dedup_key=key,
            )
            log(f"E {key} {item.id}")
            if step % 5 == 0:  # a replayed message: the same dedup key must give the same item
                old = f"r{run}-{step - 3}"
                again = await store.enqueue(ItemKind.INBOUND, "conv-x", {}, now=now, dedup_key=old)
                log(f"E {old} {again.id}")
            if step % 3 == 1:  # a user's message, accepted under the caps or refused
                message = f"a{run}-{step}"
                payload = {"key": message, "author_id": step % AUTHORS, "guild_id": 1}
                try:
                    accepted = await store.accept(
                        message, ItemKind.INBOUND, f"conv{step % CONVERSATIONS}", payload,
                        now=now, lease_seconds=LEASE, claim=False, caps=CAPS,
                    )
                except QueueFullError as exc:
                    log(f"R {message} {exc.scope}")
                else:
                    assert accepted is not None
                    log(f"A {message} {accepted.id}")
            for claimed in await store.claim(now=now, lease_seconds=LEASE, limit=2):
                log(f"C {run} {claimed.id} {claimed.conversation_key}")
                if hang_after_claim:  # a worker that dies holding a claim, for certain
                    time.sleep(30)
                await store.complete(claimed.id, now=now)
                log(f"D {claimed.id}")
            if step % 16 == 1:  # what finished in earlier runs goes; this run's items stay
                pruned = await store.housekeeping(
                    now=now, done_retention=RUN_SPAN, queue_retention=RUN_SPAN,
                    history_retention=RUN_SPAN, processed_retention=RUN_SPAN, batch_rows=7,
                )
                log(f"H {pruned.done_items}")

    asyncio.run(work())
    os._exit(0)


@dataclass
class Log:
    """What the children reported as committed."""

    enqueued: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    pruned: int = 0
    claims: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    done: set[int] = field(default_factory=set)
    claim_order: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


def _read_log(path: Path) -> Log:
    result = Log()
    if not path.exists():
        return result
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "E":
            previous = result.enqueued.setdefault(parts[1], int(parts[2]))
            assert previous == int(parts[2]), f"dedup key {parts[1]} gave two items: {previous}, {parts[2]}"
        elif parts[0] == "C":
            run, item_id = int(parts[1]), int(parts[2])
            assert item_id not in result.done, f"item {item_id} claimed again after it was completed"
            assert run not in result.claims[item_id], f"item {item_id} claimed twice under a live lease"
            result.claims[item_id].append(run)
            result.claim_order[parts[3]].append(item_id)
        elif parts[0] == "D":
            result.done.add(int(parts[1]))
        elif parts[0] == "A":
            result.accepted[parts[1]] = int(parts[2])
        elif parts[0] == "R":
            result.refused.add(parts[1])
        elif parts[0] == "S":
            continue
        elif parts[0] == "H":
            result.pruned += int(parts[1])
    return result


def _steps_logged(path: Path, run: int) -> int:
    """How many of its own messages run ``run`` has enqueued (and logged) so far."""
    if not path.exists():
        return 0
    return path.read_text().count(f"E r{run}-")


def _audit_deletions(conn: sqlite3.Connection) -> None:
    """Record every queue row deleted from now on, with its state, in the deleting transaction.

    Installed once the schema exists, after the run that created it: that run had no item
    finished in an earlier run, so its housekeeping deleted nothing that goes unrecorded.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS test_deleted "
        "(id INTEGER PRIMARY KEY, state TEXT NOT NULL, dedup_key TEXT)"
    )
    conn.execute(
        "CREATE TRIGGER IF NOT EXISTS test_audit AFTER DELETE ON queue "
        "BEGIN INSERT INTO test_deleted (id, state, dedup_key) VALUES (OLD.id, OLD.state, OLD.dedup_key); END"
    )
    conn.commit()


# The same audit in PostgreSQL, installed in the test's own database before the first run.
_PG_AUDIT = """
CREATE TABLE test_deleted (id BIGINT PRIMARY KEY, state TEXT NOT NULL, dedup_key TEXT);
CREATE FUNCTION test_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO test_deleted VALUES (OLD.id, OLD.state, OLD.dedup_key); RETURN NULL; END $$;
CREATE TRIGGER test_audit AFTER DELETE ON queue FOR EACH ROW EXECUTE FUNCTION test_audit();
"""


def _sqlite_rows(db_path: Path) -> Rows:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(db_path)
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()

    return rows


def _check(db_path: Path | None, rows: Rows, log: Log) -> None:
    """The database agrees with everything the children reported as committed. ``db_path`` is the
    SQLite file (None on PostgreSQL), ``rows`` reads the database."""
    if db_path is not None:
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "queue" not in tables:  # killed during the very first migration: it must have rolled back
                assert not log.enqueued
                return
            if "test_deleted" not in tables:
                _audit_deletions(conn)
            live = "SELECT COUNT(*) FROM queue WHERE state IN ('pending', 'claimed')"
            assert conn.execute("SELECT n FROM queue_live").fetchone()[0] == conn.execute(live).fetchone()[0]
        finally:
            conn.close()
    deleted = dict(rows("SELECT id, state FROM test_deleted"))
    assert set(deleted.values()) <= {ItemState.DONE.value}, f"housekeeping deleted live items: {deleted}"
    queue = dict(rows("SELECT id, state FROM queue"))
    counts = dict(rows("SELECT dedup_key, COUNT(*) FROM queue GROUP BY dedup_key"))
    processed = {r[0] for r in rows("SELECT message_id FROM processed")}
    reported = [*log.enqueued.items(), *((f"msg:{m}", i) for m, i in log.accepted.items())]
    for key, item_id in reported:
        if item_id not in queue:  # housekeeping may delete an item only once it is done
            assert item_id in deleted and key not in counts, f"{key} (item {item_id}) was lost"
            continue
        assert counts.get(key) == 1, f"{key} present {counts.get(key, 0)} times"
    # An id marked processed has its item (or had it, done and pruned): else the message is lost,
    # never answered and taken for a replay forever. Pruned processed ids are no longer checked.
    deleted_keys = {r[0] for r in rows("SELECT dedup_key FROM test_deleted WHERE dedup_key IS NOT NULL")}
    for (message,) in rows("SELECT message_id FROM processed"):
        key = f"msg:{message}"
        assert key in counts or key in deleted_keys, f"{message} is marked processed but has no item: lost"
    for message in log.refused:  # a refusal stores nothing, so a replay could still be accepted
        trace = message in processed or f"msg:{message}" in counts
        assert not trace, f"refused {message} left a trace"
    for item_id in log.done:
        state = queue.get(item_id, ItemState.DONE.value)
        assert state == ItemState.DONE.value, f"completed item {item_id} is {state}"
    for conversation, ids in log.claim_order.items():
        assert ids == sorted(ids), f"{conversation} served out of order: {ids}"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_queue_survives_110_sigkills_with_nothing_lost_or_claimed_twice(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    log_path = tmp_path / "committed.log"
    db_path: Path | None
    if backend == "postgres":
        server: PostgresServer = request.getfixturevalue("pg_server")
        database, db_path = server.new_database(), None
        server.execute(database, _PG_AUDIT)

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return server.fetch(database, sql)

    else:
        db_path = tmp_path / "queue.sqlite3"
        database, rows = str(db_path), _sqlite_rows(db_path)
    ctx = multiprocessing.get_context("fork")  # fork: no re-import, so a child starts in milliseconds
    rng = random.Random(20261123)
    started = time.monotonic()
    for run in range(KILLS):
        child = ctx.Process(target=_child, args=(database, str(log_path), run))
        child.start()
        if run % 10:
            # Most kills land once the child works, after a number of its steps (not a time: on a
            # loaded machine a child may take a second to get going); every tenth kill lands while
            # it starts (opens the file or connects, registers, checks the schema).
            steps = rng.randint(1, 5)
            deadline = time.monotonic() + 20
            while _steps_logged(log_path, run) < steps and time.monotonic() < deadline and child.is_alive():
                time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))  # ... anywhere inside the step that follows
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(5)
        assert child.exitcode == -signal.SIGKILL, f"run {run} ended by itself ({child.exitcode})"
        _check(db_path, rows, _read_log(log_path))
    # One last kill that surely lands between a claim and its completion.
    child = ctx.Process(target=_child, args=(database, str(log_path), KILLS, True))
    child.start()
    for _ in range(500):
        if f"C {KILLS} " in log_path.read_text():
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(5)
    _check(db_path, rows, _read_log(log_path))
    log = _read_log(log_path)
    assert len(log.enqueued) > 2 * KILLS, "the children did too little work for the kills to mean much"
    assert len(log.done) > KILLS
    assert len(log.accepted) > KILLS // 2 and log.refused, "the caps were never reached (or always)"
    deleted = rows("SELECT COUNT(*) FROM test_deleted")[0][0]
    assert log.pruned and deleted > KILLS, "housekeeping had too little to do for the kills to mean much"
    # some kills landed between a claim and its completion, and a later run took the item back
    assert any(len(runs) > 1 for runs in log.claims.values())

    claimed = rows("SELECT id, conversation_key, lease_until FROM queue WHERE state = 'claimed'")
    left_claimed = {item_id: (key, lease) for item_id, key, lease in claimed}
    assert left_claimed and all(lease <= (KILLS + 1) * RUN_SPAN for _, lease in left_claimed.values())
    print(
        f"enqueued {len(log.enqueued)}, accepted {len(log.accepted)}, refused {len(log.refused)}, "
        f"done {len(log.done)}, pruned by housekeeping {deleted} ({log.pruned} reported), "
        f"re-claimed after a kill {sum(len(r) > 1 for r in log.claims.values())}, "
        f"left claimed by the last kills {len(left_claimed)}"
    )

    async def drain() -> None:
        async with _open(database) as store:
            # Within the last run's lease its claims stay out, and so does the rest of their conversation.
            during = KILLS * RUN_SPAN + LEASE / 2
            live = {i for i, (_, lease) in left_claimed.items() if lease > during}
            blocked = {left_claimed[i][0] for i in live}
            early = await store.claim(now=during, lease_seconds=1, limit=1000)
            assert blocked and not {i.conversation_key for i in early} & blocked
            for item in early:
                await store.fail(item.id, "put back", next_attempt_at=during)
            later = (KILLS + 2) * RUN_SPAN  # every killed worker's lease has run out
            seen: set[int] = set()
            for _ in range(10_000):
                got = await store.claim(now=later, lease_seconds=LEASE, limit=50)
                if not got:
                    break
                for item in got:
                    seen.add(item.id)
                    await store.complete(item.id)
            assert set(left_claimed) <= seen, "a killed worker's claim never came back after its lease"
            stats = await store.stats(now=later)
            assert set(stats.depth) <= {(k, ItemState.DONE) for k in ItemKind}, stats.depth

    asyncio.run(drain())
    _check(db_path, rows, log)
    assert time.monotonic() - started < 60
