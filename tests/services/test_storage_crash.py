"""Crash safety of the durable queue: a worker process is SIGKILLed at random moments, 100+ times.

The worker (a forked child) enqueues with dedup keys, accepts messages under queue caps, claims
and completes in a loop, runs housekeeping now and then, and appends a line to a log only after
each operation's commit has returned. After every kill the parent checks the database against
the log: it opens, ``integrity_check`` is ok, every enqueue and acceptance the child reported is
present exactly once (or was completed and then pruned by housekeeping, never pruned while
live), every refused message left nothing behind (no item, no processed id), every reported
completion is done, no item was claimed twice under a live lease, each conversation was served
in order, and the kept count of live items matches the items. At the end the killed workers'
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
from dataclasses import dataclass, field
from pathlib import Path

from resilience.degradation import ItemKind, ItemState, QueueCaps
from resilience.errors import QueueFullError
from services.storage import SqliteStore

KILLS = 110
RUN_SPAN = 1_000.0
LEASE = 100.0
CONVERSATIONS = 4
AUTHORS = 3
CAPS = QueueCaps(max_items=30, max_pending_per_user=1)


def _child(db_path: str, log_path: str, run: int, hang_after_claim: bool = False) -> None:
    """Queue work forever (bounded), logging each operation after its commit returned."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(line: str) -> None:
        os.write(fd, (line + "\n").encode())  # one write() syscall: all or nothing under SIGKILL

    async def work() -> None:
        store = SqliteStore(Path(db_path), statement_timeout=10.0)
        await store.start()
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
        elif parts[0] == "H":
            result.pruned += int(parts[1])
    return result


def _audit_deletions(conn: sqlite3.Connection) -> None:
    """Record every queue row deleted from now on, with its state, in the deleting transaction.

    Installed once the schema exists, after the run that created it: that run had no item
    finished in an earlier run, so its housekeeping deleted nothing that goes unrecorded.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS test_deleted (id INTEGER PRIMARY KEY, state TEXT NOT NULL)")
    conn.execute(
        "CREATE TRIGGER IF NOT EXISTS test_audit AFTER DELETE ON queue "
        "BEGIN INSERT INTO test_deleted (id, state) VALUES (OLD.id, OLD.state); END"
    )
    conn.commit()


def _check(db_path: Path, log: Log) -> None:
    """The database agrees with everything the children reported as committed."""
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "queue" not in tables:  # killed during the very first migration: it must have rolled back
            assert not log.enqueued
            return
        if "test_deleted" not in tables:
            _audit_deletions(conn)
        deleted = dict(conn.execute("SELECT id, state FROM test_deleted").fetchall())
        assert set(deleted.values()) <= {ItemState.DONE.value}, f"housekeeping deleted live items: {deleted}"
        rows = dict(conn.execute("SELECT id, state FROM queue").fetchall())
        counts = dict(conn.execute("SELECT dedup_key, COUNT(*) FROM queue GROUP BY dedup_key").fetchall())
        processed = {r[0] for r in conn.execute("SELECT message_id FROM processed")}
        reported = [*log.enqueued.items(), *((f"msg:{m}", i) for m, i in log.accepted.items())]
        for key, item_id in reported:
            if item_id not in rows:  # housekeeping may delete an item only once it is done
                assert item_id in deleted and key not in counts, f"{key} (item {item_id}) was lost"
                continue
            assert counts.get(key) == 1, f"{key} present {counts.get(key, 0)} times"
        for message in log.refused:  # a refusal stores nothing, so a replay could still be accepted
            trace = message in processed or f"msg:{message}" in counts
            assert not trace, f"refused {message} left a trace"
        for item_id in log.done:
            state = rows.get(item_id, ItemState.DONE.value)
            assert state == ItemState.DONE.value, f"completed item {item_id} is {state}"
        live = conn.execute("SELECT COUNT(*) FROM queue WHERE state IN ('pending', 'claimed')").fetchone()[0]
        assert conn.execute("SELECT n FROM queue_live").fetchone()[0] == live
        for conversation, ids in log.claim_order.items():
            assert ids == sorted(ids), f"{conversation} served out of order: {ids}"
    finally:
        conn.close()


def test_queue_survives_110_sigkills_with_nothing_lost_or_claimed_twice(tmp_path: Path) -> None:
    db_path, log_path = tmp_path / "queue.sqlite3", tmp_path / "committed.log"
    ctx = multiprocessing.get_context("fork")  # fork: no re-import, so a child starts in milliseconds
    rng = random.Random(20261123)
    started = time.monotonic()
    for run in range(KILLS):
        child = ctx.Process(target=_child, args=(str(db_path), str(log_path), run))
        child.start()
        time.sleep(rng.uniform(0.002, 0.1))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(5)
        assert child.exitcode == -signal.SIGKILL, f"run {run} ended by itself ({child.exitcode})"
        _check(db_path, _read_log(log_path))
    # One last kill that surely lands between a claim and its completion.
    child = ctx.Process(target=_child, args=(str(db_path), str(log_path), KILLS, True))
    child.start()
    for _ in range(500):
        if f"C {KILLS} " in log_path.read_text():
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(5)
    _check(db_path, _read_log(log_path))
    log = _read_log(log_path)
    assert len(log.enqueued) > 2 * KILLS, "the children did too little work for the kills to mean much"
    assert len(log.done) > KILLS
    assert len(log.accepted) > KILLS // 2 and log.refused, "the caps were never reached (or always)"
    conn = sqlite3.connect(db_path)
    deleted = conn.execute("SELECT COUNT(*) FROM test_deleted").fetchone()[0]
    conn.close()
    assert log.pruned and deleted > KILLS, "housekeeping had too little to do for the kills to mean much"
    # some kills landed between a claim and its completion, and a later run took the item back
    assert any(len(runs) > 1 for runs in log.claims.values())

    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT id, conversation_key, lease_until FROM queue WHERE state = 'claimed'")
    left_claimed = {item_id: (key, lease) for item_id, key, lease in rows}
    conn.close()
    assert left_claimed and all(lease <= (KILLS + 1) * RUN_SPAN for _, lease in left_claimed.values())
    print(
        f"enqueued {len(log.enqueued)}, accepted {len(log.accepted)}, refused {len(log.refused)}, "
        f"done {len(log.done)}, pruned by housekeeping {deleted} ({log.pruned} reported), "
        f"re-claimed after a kill {sum(len(r) > 1 for r in log.claims.values())}, "
        f"left claimed by the last kills {len(left_claimed)}"
    )

    async def drain() -> None:
        async with SqliteStore(db_path) as store:
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
    _check(db_path, log)
    assert time.monotonic() - started < 60
