"""What only the PostgreSQL store has: several processes on one database (claims, leases, liveness,
exactly-once, order), its migrations, notifications between processes, and its failures.

A real PostgreSQL (``tests/pg.py``); "processes" are stores of their own (their own pool and
session), or forked children killed with SIGKILL where dying for real matters.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from resilience.degradation import ItemKind, ItemState, QueueCaps
from resilience.errors import Category, QueueFullError, classify
from services.coordination import GONE_AFTER_SECONDS
from services.pg_storage import (
    CONVERSATION_LOCK,
    MIGRATIONS_DIR,
    DatabaseUnavailableError,
    PostgresStore,
    describe_url,
    migration_files,
)
from services.storage import CLAIM_RELEASED, LEASE_RAN_OUT, SchemaTooNewError, StorageError, claim_abandoned
from tests.pg import PostgresServer, free_port

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
T0 = 1_700_000_000.0
LEASE = 60.0
LATEST = migration_files()[-1][0]  # the newest schema version this build ships


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(pg_url) as s:
        yield s


async def accept(store: PostgresStore, message_id: int, key: str = "c1", *, now: float = T0) -> Any:
    return await store.accept(message_id, IN, key, {"m": message_id}, now=now, lease_seconds=LEASE)


# -- migrations ------------------------------------------------------------------------------------


async def test_processes_starting_together_on_an_empty_database_migrate_it_once(
    pg_server: PostgresServer,
) -> None:
    """The migration runs under an advisory lock: four processes at once, one migration, all start."""
    url = pg_server.new_database(migrated=False)
    stores = [PostgresStore(url) for _ in range(4)]
    await asyncio.gather(*(s.start() for s in stores))
    try:
        versions = pg_server.fetch(url, "SELECT version FROM schema_version ORDER BY version")
        assert [v for (v,) in versions] == [n for n, _ in migration_files()] == list(range(1, LATEST + 1))
        assert [await s.schema_version() for s in stores] == [LATEST] * 4
    finally:
        await asyncio.gather(*(s.stop() for s in stores))


async def test_a_database_of_a_newer_bot_is_refused_with_a_sentence(
    pg_url: str, pg_server: PostgresServer
) -> None:
    pg_server.execute(pg_url, f"INSERT INTO schema_version (version) VALUES ({LATEST + 1})")
    store = PostgresStore(pg_url)
    with pytest.raises(SchemaTooNewError) as info:
        await store.start()
    assert (info.value.found, info.value.supported) == (LATEST + 1, LATEST)
    assert str(info.value) == (
        f"{describe_url(pg_url)} has schema version {LATEST + 1}, this build supports up to {LATEST}; "
        "upgrade the bot or restore an older database"
    )
    assert store.health()["open"] is False


async def test_a_new_migration_file_is_applied_once_at_the_next_start(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database(migrated=False)
    async with PostgresStore(url) as s:
        await s.append_turn("c", "user", "kept", now=T0)
    files = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, files)
    (files / f"{LATEST + 1:04d}_notes.sql").write_text("ALTER TABLE turns ADD COLUMN note TEXT;\n")
    for _ in range(2):
        async with PostgresStore(url, migrations_dir=files) as s:
            assert await s.schema_version() == LATEST + 1
            assert [t.text for t in await s.history("c")] == ["kept"]
    assert pg_server.fetch(url, "SELECT COUNT(*) FROM schema_version") == [(LATEST + 1,)]
    with pytest.raises(SchemaTooNewError):  # the bot of the version before is refused now
        await PostgresStore(url).start()


async def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    for name in ("0001_a.sql", "0003_c.sql"):
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(StorageError, match="without gaps"):
        migration_files(tmp_path)


# -- several processes on one database ------------------------------------------------------------


async def test_a_live_process_keeps_its_claims_and_a_dead_ones_come_back(pg_url: str) -> None:
    """release_claims at start-up takes back what gone processes held, never what a live one holds."""
    async with PostgresStore(pg_url) as live, PostgresStore(pg_url) as starting:
        mine = await accept(live, 1)
        assert await starting.release_claims() == 0
        dead = PostgresStore(pg_url)
        await dead.start()
        theirs = await accept(dead, 2, key="c2")
        await dead.stop()
        assert await starting.release_claims() == 1
        [again] = await starting.claim(now=T0, lease_seconds=LEASE)  # long before the lease runs out
        assert again.id == theirs.id and again.last_error == CLAIM_RELEASED and claim_abandoned(again)
        assert (await live.get(mine.id)).state is ItemState.CLAIMED  # type: ignore[union-attr]


def _claim_and_die(url: str, ready: Any) -> None:
    async def work() -> None:
        store = PostgresStore(url)
        await store.start()
        item = await store.accept(7, IN, "c7", {"m": 7}, now=T0, lease_seconds=LEASE)
        assert item is not None
        ready.set()
        await asyncio.sleep(60)

    asyncio.run(work())


async def test_a_killed_process_loses_its_lease_and_another_picks_its_item_up_after_it(pg_url: str) -> None:
    """kill -9 of a process holding a claim: nobody else takes the item while its lease runs, anyone
    takes it once the lease ran out (marked for a look at the channel first), and it is gone from
    the living processes at once."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_claim_and_die, args=(pg_url, ready))
    child.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10)
        async with PostgresStore(pg_url) as other:
            alive = {p.name: p.alive for p in await other.processes()}
            assert list(alive.values()).count(True) == 2
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            await asyncio.to_thread(child.join, 5)
            for _ in range(100):  # the server notices the closed socket at once
                if sum(p.alive for p in await other.processes()) == 1:
                    break
                await asyncio.sleep(0.02)
            assert [p.this for p in await other.processes() if p.alive] == [True]
            assert await other.claim(now=T0 + LEASE - 1, lease_seconds=LEASE) == []
            [item] = await other.claim(now=T0 + LEASE, lease_seconds=LEASE)
            assert item.last_error == LEASE_RAN_OUT and claim_abandoned(item)
            assert await accept(other, 7, key="c7") is None  # still processed: never answered twice
    finally:
        if child.is_alive():
            child.kill()


async def test_a_killed_process_is_gone_after_three_missed_heartbeats_and_its_item_comes_back(
    pg_url: str,
) -> None:
    """The heartbeat of any live process hands back the claims of one that lost its connection and
    stopped beating, well before their lease would run out."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_claim_and_die, args=(pg_url, ready))
    child.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.to_thread(child.join, 5)
        async with PostgresStore(pg_url) as other:
            now = time.time()
            assert await other.beat({}, now=now) == 0  # it beat at its start: not gone yet
            assert await other.beat({}, now=now + GONE_AFTER_SECONDS + 1) == 1
            [item] = await other.claim(now=T0, lease_seconds=LEASE)  # long before its lease ends
            assert item.last_error == CLAIM_RELEASED and claim_abandoned(item)
    finally:
        if child.is_alive():
            child.kill()


async def test_a_process_whose_session_dropped_but_still_beats_keeps_its_claims(pg_url: str) -> None:
    async with PostgresStore(pg_url) as blip, PostgresStore(pg_url) as other:
        await accept(blip, 1)
        watcher = blip._watcher
        assert watcher is not None and blip._session is not None
        watcher.cancel()  # it would open the session again at once: hold it lost for the test
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", blip._session.get_server_pid())
        finally:
            await conn.close()
        for _ in range(100):
            if [p.alive for p in await other.processes()] == [False, True]:
                break
            await asyncio.sleep(0.02)
        now = time.time()
        await blip.beat({}, now=now + 100)  # it still works and beats, through its pool
        assert await other.beat({}, now=now + 100 + GONE_AFTER_SECONDS - 1) == 0
        assert await other.release_claims() == 0
        assert await other.beat({}, now=now + 100 + GONE_AFTER_SECONDS + 1) == 1  # then it stops beating


async def test_one_message_accepted_by_two_processes_at_once_is_accepted_once(pg_url: str) -> None:
    """A replayed event reaching two processes: exactly one gets the item, the other sees a replay."""
    async with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        for message_id in range(1, 41):
            results = await asyncio.gather(
                accept(one, message_id, key=f"k{message_id}"), accept(two, message_id, key=f"k{message_id}")
            )
            assert sum(r is not None for r in results) == 1, results
        assert len(await one.list(limit=100)) == 40


async def test_items_of_one_conversation_commit_in_the_order_of_their_ids(pg_url: str) -> None:
    """Process A is adding an item to a conversation (its transaction still open); process B's item
    for the same conversation waits for A's to commit, so no claim can see B's item (a higher id)
    while A's is still invisible, and the conversation is served in order."""
    async with PostgresStore(pg_url) as b, PostgresStore(pg_url) as drain:
        a = await asyncpg.connect(pg_url)
        try:
            tx = a.transaction()
            await tx.start()
            # What PostgresStore.enqueue does, stopped before COMMIT.
            await a.execute("SELECT pg_advisory_xact_lock($1, hashtext('busy'))", CONVERSATION_LOCK)
            first = await a.fetchval(
                "INSERT INTO queue (kind, conversation_key, payload, state, created_at, next_attempt_at) "
                "VALUES ('outbound', 'busy', '{}', 'pending', $1, $1) RETURNING id",
                T0,
            )
            second = asyncio.create_task(b.enqueue(OUT, "busy", {}, now=T0))  # no trigger row to wait on
            await asyncio.sleep(0.3)
            assert not second.done(), "B's item committed before A's older one"
            assert await drain.claim(now=T0, lease_seconds=LEASE) == []
            await tx.commit()
        finally:
            await a.close()
        later = await asyncio.wait_for(second, 5)
        assert later.id > first
        assert [i.id for i in await drain.claim(now=T0, lease_seconds=LEASE)] == [first]


async def test_housekeeping_runs_in_one_process_at_a_time(pg_url: str) -> None:
    async with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        for i in range(30):
            item = await one.enqueue(IN, f"c{i}", {}, now=T0)
            await one.dead_letter(item.id, "gave up", now=T0)
        args = {"now": T0 + 9e6, "queue_retention": 0, "history_retention": 0, "processed_retention": 0}
        conn = await asyncpg.connect(pg_url)
        try:
            async with conn.transaction():  # a third process is in the middle of a batch
                await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", 0x626F7405)
                assert (await two.housekeeping(**args)).total == 0
        finally:
            await conn.close()
        reports = await asyncio.gather(
            one.housekeeping(**args, batch_rows=5), two.housekeeping(**args, batch_rows=5)
        )
        assert sum(r.dead_items for r in reports) == 30 and await one.list() == []


# -- notifications and heartbeats ----------------------------------------------------------------------


async def test_a_notification_reaches_the_other_processes_within_a_second_and_not_its_sender(
    pg_url: str,
) -> None:
    async with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        got: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
        arrived = asyncio.Event()

        async def heard_by_two(payload: dict[str, Any]) -> None:
            got["two"].append(payload)
            arrived.set()

        async def heard_by_one(payload: dict[str, Any]) -> None:
            got["one"].append(payload)

        one.subscribe("circuit_reset", heard_by_one)
        two.subscribe("circuit_reset", heard_by_two)
        sent = time.monotonic()
        await one.notify("circuit_reset", {"names": ["gemini"]})
        await asyncio.wait_for(arrived.wait(), 1.0)
        assert time.monotonic() - sent < 1.0
        assert got["two"] == [{"names": ["gemini"], "kind": "circuit_reset", "origin": one.process_id}]
        await asyncio.sleep(0.1)
        assert got["one"] == []


async def test_a_lost_session_is_opened_again_and_subscribers_told_to_read_everything_again(
    pg_url: str,
) -> None:
    async with PostgresStore(pg_url) as store, PostgresStore(pg_url) as other:
        resynced = asyncio.Event()
        heard = asyncio.Event()

        async def resync(payload: dict[str, Any]) -> None:
            resynced.set()

        async def hear(payload: dict[str, Any]) -> None:
            heard.set()

        store.subscribe("resync", resync)
        store.subscribe("ping", hear)
        pid = store._session.get_server_pid()  # type: ignore[union-attr]
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        await asyncio.wait_for(resynced.wait(), 5)
        assert store.health()["listening"]
        assert [p.alive for p in await other.processes()] == [True, True]  # its lock is held again
        await other.notify("ping", {})
        await asyncio.wait_for(heard.wait(), 1)


async def test_heartbeats_record_each_process_state_and_stopped_processes_show_as_gone(pg_url: str) -> None:
    async with PostgresStore(pg_url, process_name="bot-a") as a:
        async with PostgresStore(pg_url, process_name="bot-b") as b:
            await a.beat({"mode": "normal", "breakers": {"gemini": "open"}}, now=T0)
            await b.beat({"mode": "maintenance"}, now=T0 + 1)
            rows = {p.name: p for p in await a.processes()}
            assert rows["bot-a"].state == {"mode": "normal", "breakers": {"gemini": "open"}}
            assert rows["bot-a"].this and not rows["bot-b"].this and rows["bot-b"].beat_at == T0 + 1
        rows = {p.name: p for p in await a.processes()}
        assert not rows["bot-b"].alive and rows["bot-b"].stopped_at is not None and rows["bot-a"].alive
        await a.beat({}, now=time.time() + 2 * 3600)  # an hour later the gone one is forgotten
        assert [p.name for p in await a.processes()] == ["bot-a"]


# -- what PostgreSQL stores differently ---------------------------------------------------------------


async def test_nul_characters_are_kept_in_payloads_and_replaced_in_text(store: PostgresStore) -> None:
    item = await store.enqueue(IN, "c", {"content": "a\x00b"}, now=T0)
    assert (await store.get(item.id)).payload == {"content": "a\x00b"}  # type: ignore[union-attr]
    await store.append_turn("c", "user", "a\x00b", now=T0)
    assert [t.text for t in await store.history("c")] == ["a\ufffdb"]


async def test_the_caps_are_counted_through_partial_indexes(store: PostgresStore, pg_url: str) -> None:
    """Each cap's count reads its own partial index (a backlog of thousands is not scanned per message)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(  # a backlog of 5,000 messages of 500 users in 100 guilds
            "INSERT INTO queue (kind, conversation_key, payload, author_id, guild_id, state, created_at, "
            "next_attempt_at) SELECT 'inbound', 'c' || n, '{}', n % 500, n % 100, 'pending', 0, 0 "
            "FROM generate_series(1, 5000) AS n"
        )
        await conn.execute("ANALYZE queue")
        indexes = (("author_id", "queue_pending_by_author"), ("guild_id", "queue_pending_by_guild"))
        for column, index in indexes:
            rows = await conn.fetch(
                f"EXPLAIN (FORMAT TEXT) SELECT COUNT(*) FROM (SELECT 1 FROM queue WHERE state = 'pending' "
                f"AND kind = 'inbound' AND {column} = 1 LIMIT 5) AS c"
            )
            plan = " | ".join(r[0] for r in rows)
            assert index in plan, plan
    finally:
        await conn.close()
    caps = QueueCaps(max_pending_per_user=1)
    message = {"author_id": 9999}
    await store.accept(1, IN, "a", message, now=T0, lease_seconds=LEASE, claim=False, caps=caps)
    with pytest.raises(QueueFullError):
        await store.accept(2, IN, "b", message, now=T0, lease_seconds=LEASE, claim=False, caps=caps)


# -- failures ----------------------------------------------------------------------------------------


async def test_an_unreachable_database_is_a_transient_error_naming_where_not_the_password() -> None:
    url = f"postgresql://bot:s3cret-pw@127.0.0.1:{free_port()}/botdb"
    store = PostgresStore(url, connect_timeout=2.0)
    with pytest.raises(DatabaseUnavailableError) as info:
        await store.start()
    message = str(info.value)
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/botdb" in message and "s3cret" not in message
    verdict = classify(info.value)
    assert verdict.category is Category.CONNECTION and verdict.retryable


async def test_a_connection_cut_mid_operation_fails_that_call_transiently_and_the_next_one_works(
    store: PostgresStore, pg_url: str
) -> None:
    await store.append_turn("c", "user", "before", now=T0)
    other = await asyncpg.connect(pg_url)
    try:
        async with other.transaction():
            await other.execute("LOCK TABLE turns IN EXCLUSIVE MODE")
            write = asyncio.create_task(store.append_turn("c", "user", "lost", now=T0))
            waiting = None
            for _ in range(200):  # the store's connection waits for the lock: cut it there
                waiting = await other.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' LIMIT 1"
                )
                if waiting is not None:
                    break
                await asyncio.sleep(0.01)
            assert waiting is not None
            await other.execute("SELECT pg_terminate_backend($1)", waiting)
            with pytest.raises(DatabaseUnavailableError) as info:
                await write
    finally:
        await other.close()
    assert classify(info.value).retryable and store.health()["consecutive_failures"] == 1
    await store.append_turn("c", "user", "after", now=T0)
    assert [t.text for t in await store.history("c")] == ["before", "after"]
