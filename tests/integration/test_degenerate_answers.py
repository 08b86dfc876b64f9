"""Degenerate Gemini output against a Discord that refuses blank messages, end to end.

The Discord emulator refuses what Discord refuses: content that is only whitespace is "Cannot
send an empty message" (400, code 50006). A model can answer with 5,000 spaces or newlines; each
answer below gets either the answer's visible text or the "no answer" sentence, never a refused
chunk that stops the delivery and loses the rest. The real ``GeminiBot`` runs in-process
(``live_bot`` from ``test_pipeline``) against fresh emulators; the sandbox Gemini answers a
prompt with a canned text (``responder.CANNED``).
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import texts
from bot.inbound import Inbound
from resilience.degradation import ItemKind, ItemState
from sandbox import responder
from services.gemini import USER_MESSAGES, ReplyKind
from tests.integration.harness import running_emulators
from tests.integration.test_drain import advance_while, shift_time
from tests.integration.test_pipeline import Live, live_bot

QUIET = 0.3  # seconds a test watches for something that must not happen


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as bot:
        yield bot


async def settled(live: Live) -> list[ItemState]:
    """The queue's item states once no item is pending or claimed any more (5 s at most)."""
    async with asyncio.timeout(5):
        while True:
            found = [i.state for i in await live.app.storage.list()]
            if found and all(s in (ItemState.DONE, ItemState.DEAD) for s in found):
                return found
            await asyncio.sleep(0.02)


def shown(live: Live) -> list[str]:
    """What the bot's messages in #general show (invisible format characters left out)."""
    return ["".join(c for c in m.content if unicodedata.category(c) != "Cf") for m in live.sent()]


def refused_sends(live: Live) -> list[int | None]:
    return [r.status for r in live.discord.requests_for("send") if r.status != 200]


@pytest.mark.parametrize("blank", [" " * 5000, "\n" * 5000, " \n" * 2500])
async def test_an_answer_of_only_whitespace_gets_the_empty_answer_sentence(
    live: Live, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    """The user is told Gemini's answer was empty; nothing is recorded as answered."""
    monkeypatch.setitem(responder.CANNED, "say nothing", blank)
    msg = await live.say("say nothing")
    await live.wait_replies(msg["id"])
    assert shown(live) in ([USER_MESSAGES[ReplyKind.EMPTY]], [texts.no_answer()])
    assert await settled(live) == [ItemState.DONE]
    async with asyncio.timeout(5):  # counted once the pipeline is done with the message
        while live.app.metrics.messages.labels("refused")._value.get() != 1:
            await asyncio.sleep(0.02)
    assert live.app.metrics.messages.labels("answered")._value.get() == 0
    assert refused_sends(live) == []


async def test_text_around_five_thousand_newlines_arrives_whole(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text, 5,000 newlines, text: both texts reach the channel (no chunk of only newlines is
    sent), in order, and the item is done, not dead-lettered."""
    monkeypatch.setitem(responder.CANNED, "spread out", "first words" + "\n" * 5000 + "last words")
    msg = await live.say("spread out")
    await live.wait_replies(msg["id"])
    await live.discord.wait_until(lambda: "last words" in "".join(shown(live)), 5)
    assert await settled(live) == [ItemState.DONE]
    contents = shown(live)
    assert all(c.strip() for c in contents)
    joined = "".join(contents)
    assert joined.index("first words") < joined.index("last words")
    assert refused_sends(live) == []


async def test_an_answer_queued_by_an_older_version_with_a_blank_chunk_is_delivered_whole(live: Live) -> None:
    """The splitter before this version cut "text + 5,000 newlines + text" into three chunks, the
    middle one only newlines. Such an answer, still in the outbound queue after an upgrade, reaches
    the user whole: the blank chunk is not sent (Discord refuses it with 50006, which dead-lettered
    the item and lost the last chunk), and the chunks with text arrive once each."""
    msg = await live.say("an old question", mention=False)  # not for the bot: only a message to reply to
    inbound = Inbound(int(msg["id"]), live.general, live.discord.guild_id, int(msg["author"]["id"]), "old")
    chunks = ["first words" + "\n" * 1500, "\n" * 1900, "\n" * 1000 + "last words"]
    payload = inbound.payload(chunks=chunks, outcome="answered_late", chunk_offset=0)
    await live.app.storage.enqueue(ItemKind.OUTBOUND, inbound.key, payload, now=live.app.clock.time())
    live.app.drain_wake()
    await live.wait_replies(msg["id"])
    await live.discord.wait_until(lambda: len(live.sent()) >= 2, 5)
    assert await settled(live) == [ItemState.DONE]
    await asyncio.sleep(QUIET)
    assert shown(live) == [chunks[0], chunks[2]]
    assert refused_sends(live) == []


async def test_a_chunk_after_a_blank_one_whose_response_is_lost_is_not_posted_twice(live: Live) -> None:
    """An older version's answer [text, blank, text, text]: the third chunk is posted but its
    response is lost. The resumed delivery starts at that chunk's own index (the blank one counts
    as done), so its nonce is the one Discord saw and the resend posts nothing new."""
    clock = shift_time(live)
    msg = await live.say("an old question", mention=False)
    inbound = Inbound(int(msg["id"]), live.general, live.discord.guild_id, int(msg["author"]["id"]), "old")
    chunks = ["part one", "\n" * 100, "part three", "part four"]
    payload = inbound.payload(chunks=chunks, outcome="answered_late", chunk_offset=0)
    live.discord.faults.add("latency", "send", count=1, seconds=0.0)  # part one goes through
    live.discord.faults.add("drop", "send", count=1, after=True)  # part three: posted, answer lost
    await live.app.storage.enqueue(ItemKind.OUTBOUND, inbound.key, payload, now=live.app.clock.time())
    live.app.drain_wake()
    for _ in range(40):
        if len(live.sent()) >= 4 or shown(live)[-1:] == ["part four"]:
            break
        await advance_while(live, clock, 1)
    assert await settled(live) == [ItemState.DONE]
    await asyncio.sleep(QUIET)
    assert shown(live) == ["part one", "part three", "part four"]
    nonces = [r.json["nonce"] for r in live.discord.requests_for("send")]
    assert nonces == [f"{msg['id']}.0", f"{msg['id']}.2", f"{msg['id']}.2", f"{msg['id']}.3"]


async def test_an_answer_queued_by_a_version_without_marks_in_2000_character_chunks_arrives_whole(
    live: Live,
) -> None:
    """Chunks of the full 2,000 characters, queued before answers carried their 40-character mark:
    re-split to leave room for the mark, never refused by Discord for being 2,040 long (50035)."""
    msg = await live.say("an old question", mention=False)
    inbound = Inbound(int(msg["id"]), live.general, live.discord.guild_id, int(msg["author"]["id"]), "old")
    chunks = [responder.words_of_length(2000), responder.words_of_length(1500)]
    payload = inbound.payload(chunks=chunks, outcome="answered_late", chunk_offset=0)
    await live.app.storage.enqueue(ItemKind.OUTBOUND, inbound.key, payload, now=live.app.clock.time())
    live.app.drain_wake()
    await live.discord.wait_until(lambda: sum(map(len, shown(live))) >= 3400, 5)
    assert await settled(live) == [ItemState.DONE]
    assert refused_sends(live) == []
    assert all(len(m.content) <= 2000 for m in live.sent())
