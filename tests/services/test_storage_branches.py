"""Both backends: who said each turn, reply branches of a conversation, and forgetting them
(SQLite's migration 6, PostgreSQL's version 3)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.storage import MIGRATIONS, SqliteStore
from tests.services.conftest import OpenStore, Store

NOW = 1_700_000_000.0


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """A started store (SQLite, then PostgreSQL) keeping at most 6 turns per conversation."""
    s = open_store(history_max_messages=6, history_max_chars=10_000)
    await s.start()
    yield s
    await s.stop()


async def exchange(
    store: Store, key: str, question: int, text: str, speaker: str | None = None
) -> None:
    await store.append_turns(
        key, [("user", text, question, speaker), ("model", f"answer to {text}", None)], now=NOW
    )


async def test_a_user_turn_keeps_its_speaker_and_older_three_part_turns_still_work(
    store: Store,
) -> None:
    await exchange(store, "c", 1, "hi", "Bob (<@2>)")
    await store.append_turns("c", [("user", "plain", 3), ("model", "ok", None)], now=NOW)
    history = await store.history("c")
    assert [(t.role, t.text, t.message_id, t.speaker) for t in history] == [
        ("user", "hi", "1", "Bob (<@2>)"),
        ("model", "answer to hi", None, None),
        ("user", "plain", "3", None),
        ("model", "ok", None, None),
    ]


async def test_a_reply_to_the_latest_answer_continues_its_conversation(store: Store) -> None:
    await exchange(store, "c", 1, "first")
    await exchange(store, "c", 2, "second")
    assert await store.branch(2, "c:9") == "c"
    assert await store.branch(404, "c:9") is None  # never stored (or pruned, or forgotten)


async def test_a_reply_to_an_earlier_answer_starts_a_branch_with_the_conversation_up_to_it(
    store: Store,
) -> None:
    for n in range(1, 4):
        await exchange(store, "c", n, f"q{n}")
    assert await store.branch(1, "c:10") == "c:10"
    assert [t.text for t in await store.history("c:10")] == ["q1", "answer to q1"]
    assert len(await store.history("c")) == 6  # the conversation itself is untouched
    # A replay of the same reply finds its branch started: nothing is copied twice.
    assert await store.branch(1, "c:10") == "c:10"
    assert len(await store.history("c:10")) == 2
    # The branch grows on its own; a reply to its latest answer continues it; a reply to the
    # original question's answer (still first stored in "c") starts another branch.
    await exchange(store, "c:10", 10, "q10")
    assert await store.branch(10, "c:11") == "c:10"
    assert await store.branch(1, "c:12") == "c:12"
    assert [t.text for t in await store.history("c:12")] == ["q1", "answer to q1"]


async def test_a_branch_copies_at_most_the_history_bound(store: Store) -> None:
    for n in range(1, 6):  # the conversation keeps its newest 6 turns: q3..q5
        await exchange(store, "c", n, f"q{n}")
    assert await store.branch(1, "c:20") is None  # pruned with its turns
    assert await store.branch(4, "c:20") == "c:20"
    assert [t.text for t in await store.history("c:20")] == ["q3", "answer to q3", "q4", "answer to q4"]


async def test_forgetting_a_channel_with_its_branches_leaves_other_channels_alone(store: Store) -> None:
    for n, key in enumerate(("5", "5:1", "5:2", "50", "50:1", "6")):
        await exchange(store, key, n, "x")
    assert await store.forget("5") == 2
    assert await store.forget("5", branches=True) == 4
    remaining = {k: len(await store.history(k)) for k in ("5", "5:1", "5:2", "50", "50:1", "6")}
    assert remaining == {"5": 0, "5:1": 0, "5:2": 0, "50": 2, "50:1": 2, "6": 2}


async def test_a_database_of_schema_5_gains_speakers_and_the_message_index(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in enumerate(MIGRATIONS[:5], start=1):
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.execute(
            "INSERT INTO turns (conversation_key, role, text, message_id, created_at) "
            "VALUES ('c', 'user', 'old', '7', ?)",
            (NOW,),
        )
    async with SqliteStore(path) as s:
        [turn] = await s.history("c")
        assert (turn.text, turn.speaker) == ("old", None)
        assert await s.branch(7, "c:8") == "c"
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            str(row)
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT conversation_key, id FROM turns "
                "WHERE message_id = ? AND role = 'user' ORDER BY id LIMIT 1",
                ("7",),
            )
        )
    assert "turns_by_message" in plan
