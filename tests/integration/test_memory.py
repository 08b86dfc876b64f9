"""Semantic memory and the answer cache, end to end: real discord.py and google-genai against the emulators.

The emulated Gemini embeds with a hashed bag of words (``sandbox.gemini_caches``), so "My cat is
called Zanzibar" and "What is my cat called?" are close and the filler questions are not: recall is
deterministic. What memory recalled is read from the ``<memory>`` block of the question Gemini got.
``normal`` is Bob; ``manager`` has Manage Server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import marks, texts
from sandbox.discord_state import MANAGE_GUILD
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run

FACT = "My cat is called Zanzibar"
QUESTION = "What is my cat called?"


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        world.add_text_channel("other")  # a conversation of its own: what general said is not its history
        async with live_bot(emus, tmp_path / "data") as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


async def ask(live: Live, text: str, **kw: Any) -> str:
    """Mention the bot with ``text``; its answer, without the invisible mark."""
    msg = await live.say(text, **kw)
    [answer] = await live.wait_replies(msg["id"], channel=kw.get("channel"), timeout=10)
    return marks.strip(answer.content)


def last_question(live: Live) -> str:
    """The text of the last user turn of the last generateContent the emulator received."""
    [*_, request] = [r for r in live.gemini.requests if r.action == "generateContent"]
    *_, last = request.body["contents"]
    return "".join(part.get("text", "") for part in last["parts"])


async def remembered(live: Live, count: int) -> None:
    """Wait (bounded) until ``count`` messages in all were remembered: the write follows the answer's
    delivery in the background, so a reply on Discord comes a moment before it."""
    async with asyncio.timeout(10):
        while live.app.memory.remembered < count:
            await asyncio.sleep(0.01)
    await live.app.memory.flush()


def generations(live: Live) -> int:
    return sum(1 for r in live.gemini.requests if r.action == "generateContent")


async def memory(live: Live, sub: str, user: str = "normal", **options: Any) -> str:
    return only_text(await run(live, "memory", {sub: options}, user=user))


async def test_recall_finds_a_fact_stated_a_hundred_turns_earlier(live: Live) -> None:
    assert "Your memory is on" in await memory(live, "on")
    await ask(live, FACT)
    for n in range(100):
        await ask(live, f"Tell me about topic number {n}")
    await remembered(live, 101)

    await ask(live, QUESTION)
    question = last_question(live)
    assert question.startswith("<memory>") and FACT in question
    # The fact is far out of the history sent (HISTORY_MAX_MESSAGES): memory brought it back.
    [*_, request] = [r for r in live.gemini.requests if r.action == "generateContent"]
    history = [p.get("text", "") for c in request.body["contents"][:-1] for p in c["parts"]]
    assert history and not any("Zanzibar" in text for text in history)
    assert "topic number" not in question.split("</memory>")[0].lower()  # fillers are not recalled
    await remembered(live, 102)
    shown = await memory(live, "show")
    assert "I remember 102 things you said" in shown and "Zanzibar" not in shown  # only the newest 10


async def test_a_forgotten_fact_is_never_recalled(live: Live) -> None:
    await memory(live, "on")
    other = live.discord.channels["other"]
    await ask(live, FACT)
    await remembered(live, 1)
    await ask(live, QUESTION, channel=other)
    assert FACT in last_question(live)  # the user's memory spans channels
    await remembered(live, 2)

    assert "I forgot everything you said (2 things)" in await memory(live, "forget")
    assert await live.app.memory.store.count() == 0  # type: ignore[union-attr]
    await ask(live, QUESTION, channel=other)
    await remembered(live, 3)
    assert "Zanzibar" not in last_question(live).split("</memory>")[0]
    # Nor later, once new things are remembered (the question just asked is one).
    await ask(live, "What do you know about my cat?", channel=other)
    assert "Zanzibar" not in last_question(live).split("</memory>")[0]


async def test_with_the_embeddings_breaker_open_the_answer_comes_without_recall(live: Live) -> None:
    await memory(live, "on")
    await ask(live, FACT)
    await remembered(live, 1)
    live.app.board.get("gemini.embed").force_open(60)

    other = live.discord.channels["other"]
    answer = await ask(live, QUESTION, channel=other)
    assert answer and "memory" not in answer.lower() and texts.ACK_MARK not in answer
    assert not last_question(live).startswith("<memory>")
    # Failing embeddings (not yet an open breaker) are the same: no recall, nothing said.
    live.app.board.get("gemini.embed").reset()
    live.gemini.faults.add("503", "embeddings")
    answer = await ask(live, "What is my cat called, again?", channel=other)
    assert answer and not last_question(live).startswith("<memory>")


async def test_the_answer_cache_hits_for_the_same_question_and_context_and_misses_when_it_differs(
    live: Live,
) -> None:
    async def setting(name: str, value: str) -> None:
        await run(live, "settings", {"set": {"setting": name, "value": value}}, user="manager")

    await setting("answer_cache", "on")
    await setting("history", "0")  # no history: the context is the persona and the question
    first = await ask(live, "Pick a number")
    calls = generations(live)
    assert await ask(live, "Pick a number") == first and generations(live) == calls  # a hit
    assert live.app.answer_cache.status()["hits"] == 1
    assert live.app.http_api.sources.caches["answer_cache"]() == 1  # in the memory view, with its bound

    await setting("persona", "You are a terse oracle.")  # another context: a miss
    await ask(live, "Pick a number")
    assert generations(live) == calls + 1


async def test_ask_offers_a_cached_answer_marked_and_dated_while_gemini_is_down(live: Live) -> None:
    await run(live, "settings", {"set": {"setting": "offline_answers", "value": "on"}}, user="manager")
    first = only_text(await run(live, "ask", {"prompt": "Pick a number"}))
    number = marks.strip(first)
    live.app.board.get("gemini").force_open(60)

    record = await run(live, "ask", {"prompt": "pick a number!"})
    text = only_text(record)
    assert text.startswith(texts.ACK_MARK)  # the honest "queued" comes first
    assert f"{texts.CACHED_MARK} Meanwhile, a cached answer to the same question, from " in text
    assert " UTC (it may be out of date)" in text and number in text

    # Without the setting, no offer.
    await run(live, "settings", {"set": {"setting": "offline_answers", "value": "off"}}, user="manager")
    text = only_text(await run(live, "ask", {"prompt": "Pick a number"}))
    assert text.startswith(texts.ACK_MARK) and texts.CACHED_MARK not in text
    live.app.board.get("gemini").reset()


async def test_with_streaming_on_a_cache_hit_is_sent_whole_and_a_streamed_answer_is_cached(
    tmp_path: Path,
) -> None:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        async with live_bot(emus, tmp_path / "data", STREAMING="true", ANSWER_CACHE="true") as live:
            live.bot.install_commands()
            await live.bot.tree.sync()
            await run(live, "settings", {"set": {"setting": "history", "value": "0"}}, user="manager")
            first = await ask(live, "Pick a number")
            calls = sum(1 for r in live.gemini.requests if r.action == "streamGenerateContent")
            assert calls == 1
            assert await ask(live, "Pick a number") == first
            assert sum(1 for r in live.gemini.requests if r.action == "streamGenerateContent") == calls


async def test_memory_off_forget_one_and_a_servers_memory_by_its_managers_only(live: Live) -> None:
    await run(live, "settings", {"set": {"setting": "memory", "value": "on"}}, user="manager")
    await ask(live, FACT)  # remembered for the server (and not for Bob: his memory is off)
    await remembered(live, 1)
    other = live.discord.channels["other"]
    await ask(live, QUESTION, channel=other, author="manager")  # anyone in the server gets the recall
    assert FACT in last_question(live)
    await remembered(live, 2)

    shown = await memory(live, "show")
    assert "Your memory is off" in shown and "This server's memory is on" in shown
    found = re.search(r"\n`(\d+)` ", shown)  # the number of Bob's newest memory
    assert found is not None
    first = found.group(1)
    assert "I forgot memory" in await memory(live, "forget", item=int(first))
    assert "I have no memory" in await memory(live, "forget", item=int(first))

    refused = await memory(live, "forget", server=True)
    assert "needs the Manage Server permission" in refused
    assert "I forgot this server's memory (1 thing)" in await memory(
        live, "forget", user="manager", server=True
    )
    assert await live.app.memory.store.count() == 0  # type: ignore[union-attr]


async def test_on_postgresql_memory_lives_in_the_bots_database(tmp_path: Path, pg_url: str) -> None:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        emus.discord.world.add_text_channel("other")
        async with live_bot(emus, tmp_path / "data", DATABASE_URL=pg_url) as live:
            live.bot.install_commands()
            await live.bot.tree.sync()
            assert "Your memory is on" in await memory(live, "on")
            await ask(live, FACT)
            await remembered(live, 1)
            await ask(live, QUESTION, channel=live.discord.channels["other"])
            assert FACT in last_question(live)
            assert not (tmp_path / "data" / "memory.sqlite3").exists()
            assert "I forgot everything you said" in await memory(live, "forget")
