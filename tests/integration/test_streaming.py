"""Streamed answers, end to end: the real bot (discord.py, google-genai) against the emulators.

The sandbox Gemini streams its answer in 40-character chunks at ``tokens_per_second`` (a long
answer takes as long as a model writing it), and the Discord emulator records every request with
its arrival time, every message with its edits, and the buttons a message shows. Each test turns
streaming on (the suite's default is off: ``harness.TEST_SETTINGS``) and checks what users saw.
The kill -9 scenarios are in ``tests/integration/test_streaming_crash.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import marks, texts, views
from bot.splitting import split_message
from bot.streaming import PARTIAL, ROOM
from resilience.degradation import ItemKind, ItemState
from sandbox.discord_emu import SentMessage
from sandbox.responder import code_of_length, words_of_length
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot

STREAMING = {"STREAMING": "true", "GEMINI_TIMEOUT_SECONDS": "20", "PROCESSING_TIMEOUT_SECONDS": "30"}


@contextlib.asynccontextmanager
async def streaming_bot(tmp_path: Path, **settings: str) -> AsyncIterator[Live]:
    """Fresh emulators and the bot in this process, streaming on."""
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", **{**STREAMING, **settings}) as live,
    ):
        yield live


def answer_messages(live: Live, question_id: int | str, channel: int | None = None) -> list[SentMessage]:
    """The bot's messages (not deleted) that carry the mark of a chunk of the answer to the question."""
    found = []
    for m in live.sent(channel):
        mark = marks.read(m.content)
        if mark is not None and mark[0] == int(question_id) and not m.deleted:
            found.append(m)
    return found


def chunks_of(messages: list[SentMessage]) -> list[str]:
    return [marks.strip(m.content) for m in messages]


def written(live: Live, question_id: int | str, channel: int | None = None) -> bool:
    """The answer is written: it has messages, every one with its final mark, in order."""
    found = answer_messages(live, question_id, channel)
    indices = [marks.read(m.content)[1] for m in found]  # type: ignore[index]
    return bool(found) and indices == list(range(len(found)))


async def wait_written(live: Live, question_id: int | str, timeout: float = 20.0) -> list[SentMessage]:
    await live.discord.wait_until(lambda: written(live, question_id), timeout)
    return answer_messages(live, question_id)


def edit_times(live: Live) -> dict[str, list[float]]:
    """Arrival times of the edit requests Discord served, by message (its path)."""
    times: dict[str, list[float]] = defaultdict(list)
    for r in live.discord.requests:
        if r.route == "edit" and r.status == 200:
            times[r.path].append(r.time)
    return times


async def test_a_streamed_answer_shows_its_first_words_at_once_and_is_edited_at_most_once_a_second(
    tmp_path: Path,
) -> None:
    """5,000 characters at 400 tokens/s take Gemini 3 s to write. The first words are posted within
    a second of the question, with a Stop button; each message is then edited at most once per
    STREAM_EDIT_INTERVAL_SECONDS (1 s, measured between the requests Discord received), never more
    than 5 edits in 5 s in the channel (so the last edits wait), and the final edit holds exactly
    the answer, marked, with Regenerate on its last message."""
    async with streaming_bot(tmp_path, STREAM_EDIT_INTERVAL_SECONDS="1") as live:
        live.gemini.tokens_per_second = 400
        asked = time.monotonic()
        question = await live.say("reply with exactly 5000 characters of code")
        [first] = await live.wait_replies(question["id"], timeout=5)
        shown_after = first.at - asked
        assert shown_after < 1.0, shown_after
        assert len(marks.strip(first.content)) < 200 and marks.read(first.content)[1] >= PARTIAL  # type: ignore[index]
        assert first.custom_ids == [views.STOP_ID]

        messages = await wait_written(live, question["id"])
        assert chunks_of(messages) == split_message(code_of_length(5000), limit=ROOM)
        assert [m.custom_ids for m in messages] == [[]] * (len(messages) - 1) + [[views.REGENERATE_ID]]
        assert time.monotonic() - asked > 3.0  # it really was written over time

        times = edit_times(live)
        assert sum(len(t) for t in times.values()) >= 6  # edited as the text came, not only at the end
        for path, arrivals in times.items():
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert all(gap >= 1.0 for gap in gaps), (path, gaps)
        every = sorted(t for ts in times.values() for t in ts)
        assert all(b - a >= 5.0 for a, b in zip(every, every[5:], strict=False)), every
        sends = [r for r in live.discord.requests if r.route == "send"]
        assert len(sends) == len(messages) == 3  # each message posted once
        assert len(live.bot.answerer.streaming) == 0  # nothing is being written: nothing kept for Stop


async def test_a_5000_character_streamed_answer_fills_3_messages_with_its_code_fences_intact(
    tmp_path: Path,
) -> None:
    """Prose and Python blocks, exactly 5,000 characters: three messages, each showing balanced
    fences (a block cut at a message's end is closed there and reopened with its language in the
    next), together exactly the answer as the bot splits it, each posted once."""
    async with streaming_bot(tmp_path) as live:
        live.gemini.tokens_per_second = 1000
        answer = code_of_length(5000)
        question = await live.say("reply with exactly 5000 characters of code")
        messages = await wait_written(live, question["id"])
        chunks = chunks_of(messages)
        assert len(chunks) == 3
        assert chunks == split_message(answer, limit=ROOM)
        for chunk in chunks:
            fences = [line for line in chunk.split("\n") if line.startswith("```")]
            assert len(fences) % 2 == 0, chunk
            assert all(len(m.content) <= 2000 for m in messages)
        assert chunks[1].startswith("```python") or chunks[2].startswith("```python")  # a block went on
        assert len(live.sent()) == 3 and not any(m.deleted for m in live.sent())


async def test_stop_keeps_what_was_written_and_marks_it_stopped(tmp_path: Path) -> None:
    """An answer that would take 7.5 s is stopped by its asker a second after it appeared: the
    generation ends, the text written so far stays (a beginning of the answer), marked "(stopped)",
    with Regenerate instead of Stop; the exchange goes to the history as it was written."""
    async with streaming_bot(tmp_path) as live:
        live.gemini.tokens_per_second = 100
        full = words_of_length(3000)
        question = await live.say("reply with 3000 characters")
        [first] = await live.wait_replies(question["id"], timeout=5)
        await live.discord.wait_until(lambda: len(marks.strip(first.content)) > 100, timeout=5)
        click = await live.discord.click_button(live.general, first.id, views.STOP_ID, user="normal")
        stopped_at = time.monotonic()
        messages = await wait_written(live, question["id"], timeout=10)
        assert time.monotonic() - stopped_at < 3.0
        assert click.callback_type == 6  # DEFERRED_UPDATE_MESSAGE: the writer's edit follows
        text = "".join(chunks_of(messages))
        assert text.endswith("\n" + texts.STREAM_STOPPED)
        kept = text.removesuffix("\n" + texts.STREAM_STOPPED)
        assert 100 < len(kept) < 3000 and full.startswith(kept)
        assert messages[-1].custom_ids == [views.REGENERATE_ID]
        edits = len(messages[0].edits)
        await asyncio.sleep(1.5)  # the generation is over: no edit follows
        assert len(messages[0].edits) == edits
        turns = await live.app.storage.history(str(live.general))
        assert [t.role for t in turns] == ["user", "model"] and turns[1].text == kept
        [item] = [
            i for i in await live.app.storage.list() if i.payload.get("message_id") == int(question["id"])
        ]
        assert item.state is ItemState.DONE


async def test_stop_is_refused_to_a_member_who_did_not_ask_and_may_not_manage_messages(
    tmp_path: Path,
) -> None:
    """Carol (no Manage Messages) clicks Stop on Bob's answer: she alone is told why, and the answer
    goes on to the end; Alice (an administrator) may stop it."""
    async with streaming_bot(tmp_path) as live:
        live.discord.world.add_member("carol", "carol")
        live.gemini.tokens_per_second = 150
        question = await live.say("reply with 3000 characters")
        [first] = await live.wait_replies(question["id"], timeout=5)
        refused = await live.discord.click_button(live.general, first.id, views.STOP_ID, user="carol")
        await live.discord.wait_until(lambda: refused.acknowledged, timeout=3)
        assert refused.callback_type == 4 and refused.ephemeral
        assert refused.texts() == [texts.stop_refused()]
        assert first.custom_ids == [views.STOP_ID]
        by_admin = await live.discord.click_button(live.general, first.id, views.STOP_ID, user="admin")
        messages = await wait_written(live, question["id"], timeout=10)
        assert by_admin.callback_type == 6
        assert "".join(chunks_of(messages)).endswith(texts.STREAM_STOPPED)


async def test_regenerate_replaces_the_answer_by_edit_for_the_asker_only(tmp_path: Path) -> None:
    """ "Pick a number" has a different answer each time it is asked. Carol may not regenerate Bob's
    answer (told privately, nothing changes); Bob's click asks Gemini again with the conversation as
    it was and edits the same message to the new answer: no new message."""
    async with streaming_bot(tmp_path) as live:
        live.discord.world.add_member("carol", "carol")
        question = await live.say("pick a number")
        [old] = await wait_written(live, question["id"])
        before = marks.strip(old.content)
        assert before.startswith("I pick ") and old.custom_ids == [views.REGENERATE_ID]
        asked = len([r for r in live.gemini.requests if r.action == "streamGenerateContent"])

        refused = await live.discord.click_button(live.general, old.id, views.REGENERATE_ID, user="carol")
        await live.discord.wait_until(lambda: refused.acknowledged, timeout=3)
        assert refused.ephemeral and refused.texts() == [texts.regenerate_refused()]

        click = await live.discord.click_button(live.general, old.id, views.REGENERATE_ID, user="normal")
        await live.discord.wait_until(
            lambda: marks.strip(old.content) != before and written(live, question["id"]), timeout=10
        )
        assert click.callback_type == 6
        [new] = answer_messages(live, question["id"])
        assert new.id == old.id and marks.strip(new.content).startswith("I pick ")
        assert len(live.sent()) == 1 and new.custom_ids == [views.REGENERATE_ID]
        requests = [r for r in live.gemini.requests if r.action == "streamGenerateContent"]
        assert len(requests) == asked + 1
        # asked again with the conversation as it was before the old answer
        assert [c["role"] for c in requests[-1].body["contents"]] == ["user"]


async def test_a_stream_cut_mid_answer_says_interrupted_and_the_queued_retry_rewrites_the_same_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemini's stream fails after three chunks (one attempt per call): the message shown says
    "(interrupted, retrying)", the user is told the question is queued, and the drain's answer, two
    seconds later (past Discord's nonce window, shortened here to 0.5 s: only the message id the
    item keeps can lead it back), is written into the same message (edited, not posted again): one
    answer, whole, once."""
    monkeypatch.setattr("sandbox.discord_emu.NONCE_WINDOW_SECONDS", 0.5)
    async with streaming_bot(tmp_path, RETRY_MAX_ATTEMPTS="1") as live:
        live.gemini.tokens_per_second = 200
        live.gemini.faults.add("stream_error", count=1, after=3)
        question = await live.say("reply with 600 characters")
        await live.discord.wait_until(
            lambda: any(texts.STREAM_INTERRUPTED in m.content for m in answer_messages(live, question["id"])),
            timeout=10,
        )
        await live.discord.wait_until(
            lambda: any(m.content.startswith(texts.ACK_MARK) for m in live.replies_to(question["id"])),
            timeout=5,
        )
        [partial] = answer_messages(live, question["id"])
        assert marks.read(partial.content)[1] >= PARTIAL  # type: ignore[index]
        messages = await wait_written(live, question["id"], timeout=15)
        assert [m.id for m in messages] == [partial.id]
        final = marks.strip(messages[0].content)
        assert final == texts.late_answer_prefix("reply with 600 characters") + words_of_length(600)
        assert len([m for m in live.sent() if not m.content.startswith(texts.ACK_MARK)]) == 1


async def test_a_retry_after_partial_output_replaces_the_partial_text_and_never_appends_a_copy(
    tmp_path: Path,
) -> None:
    """The first attempt's stream fails after 10 chunks (400 characters shown); the retry policy
    tries again at once: the answer is shown from its start in the same messages, and the final
    text is the answer once, not its first 400 characters and then all of it."""
    async with streaming_bot(tmp_path, RETRY_MAX_ATTEMPTS="3") as live:
        live.gemini.tokens_per_second = 400
        live.gemini.faults.add("stream_error", count=1, after=10)
        question = await live.say("reply with 2500 characters")
        messages = await wait_written(live, question["id"])
        assert chunks_of(messages) == split_message(words_of_length(2500), limit=ROOM)
        assert len([r for r in live.gemini.requests if r.action == "streamGenerateContent"]) == 2
        assert len(live.sent()) == len(messages) == 2


async def test_a_streamed_answer_past_long_answer_chars_ends_as_its_opening_and_answer_md(
    tmp_path: Path,
) -> None:
    """7,000 characters with LONG_ANSWER_CHARS=6000: the messages grow to 6,000 characters and say
    the rest comes as a file (the first attempt stalls at 6,440 characters, so that view stays
    until the silence timeout; the retry writes it all); the final edit leaves one message, the
    opening plus the note, with the whole answer attached as answer.md (the others deleted)."""
    settings = {"GEMINI_MAX_OUTPUT_TOKENS": "4000", "STREAM_SILENCE_SECONDS": "2"}
    async with streaming_bot(tmp_path, **settings) as live:
        live.gemini.tokens_per_second = 2000
        live.gemini.faults.add("stream_error", count=1, mode="hang", after=161)
        question = await live.say("reply with 7000 characters")
        await live.discord.wait_until(
            lambda: any("all of it will come as" in m.content for m in live.sent()), timeout=10
        )
        shown = [marks.strip(m.content) for m in answer_messages(live, question["id"])]
        assert len(shown) == 4 and sum(len(c) for c in shown[:3]) < 6000  # messages stopped growing
        [message] = await wait_written(live, question["id"])
        assert "is in the attached `answer.md`" in message.content
        assert message.files["answer.md"].decode().rstrip() == words_of_length(7000)
        assert message.custom_ids == [views.REGENERATE_ID]
        assert [m.deleted for m in live.sent()] == [False] + [True] * (len(live.sent()) - 1)


async def test_with_streaming_off_answers_are_sent_whole_without_buttons(tmp_path: Path) -> None:
    async with streaming_bot(tmp_path, STREAMING="false") as live:
        live.gemini.tokens_per_second = 1000
        question = await live.say("reply with 3000 characters")
        await live.discord.wait_until(lambda: len(answer_messages(live, question["id"])) == 2, timeout=10)
        messages = answer_messages(live, question["id"])
        assert [marks.read(m.content)[1] for m in messages] == [0, 1]  # type: ignore[index]
        assert all(m.edits == [] and m.custom_ids == [] for m in messages)
        assert [r.action for r in live.gemini.requests if r.model] == ["generateContent"]


async def test_final_edits_discord_refuses_wait_in_the_queue_and_are_made_later_to_the_same_messages(
    tmp_path: Path,
) -> None:
    """Discord answers 503 to every edit once the text is complete: the answer goes to the queue as
    an outbound item that keeps its messages, and once edits work again the drain edits them to the
    final text: no message is posted twice."""
    async with streaming_bot(tmp_path, BREAKER_FAIL_MAX="50") as live:
        live.gemini.tokens_per_second = 1000
        question = await live.say("reply with 2500 characters")
        await live.discord.wait_until(lambda: len(answer_messages(live, question["id"])) == 2, timeout=10)
        live.discord.faults.add("503", "edit")
        posted = [m.id for m in answer_messages(live, question["id"])]
        await _wait_queued(live, int(question["id"]))
        live.discord.faults.clear()
        messages = await wait_written(live, question["id"], timeout=15)
        assert [m.id for m in messages] == posted
        assert chunks_of(messages) == split_message(words_of_length(2500), limit=ROOM)
        assert len([r for r in live.discord.requests if r.route == "send" and r.status == 200]) == 2


async def _wait_queued(live: Live, question_id: int) -> None:
    """Until the answer waits in the queue as an outbound item."""
    async with asyncio.timeout(10):
        while True:
            items = await live.app.storage.list()
            if any(
                i.payload.get("message_id") == question_id
                and i.kind is ItemKind.OUTBOUND
                and i.state is ItemState.PENDING
                for i in items
            ):
                return
            await asyncio.sleep(0.05)


async def test_a_streamed_answer_never_pings_everyone_or_a_role_in_its_posts_or_its_edits(
    tmp_path: Path,
) -> None:
    """The sandbox Gemini echoes "@everyone" and a role mention: the post and every edit of the
    streamed answer carry allowed mentions that let nobody but the asker be pinged."""
    async with streaming_bot(tmp_path) as live:
        live.gemini.tokens_per_second = 100
        role = live.discord.world.admin_role_id
        question = await live.say(f"@everyone and <@&{role}>, {words_of_length(200)}")
        [message] = await wait_written(live, question["id"])
        assert "@everyone" in message.content and f"<@&{role}>" in message.content
        assert message.edits, "the answer was edited as it was written"
        asker = str(live.discord.users["normal"])
        for body in [{"allowed_mentions": message.allowed_mentions}, *message.edits]:
            mentions = body["allowed_mentions"]
            assert mentions["parse"] == [] and mentions.get("roles", []) == [], body
            assert [str(u) for u in mentions.get("users", [])] in ([], [asker])
        assert message.pings <= {f"user:{asker}"}


async def test_a_late_answer_to_a_slash_command_streams_in_the_channel_without_a_regenerate_button(
    tmp_path: Path,
) -> None:
    """/ask while Gemini fails: the follow-up says it is queued, and the drain streams the answer in
    the channel, mentioning the asker; there is no question message to ask again, so no Regenerate."""
    async with streaming_bot(tmp_path, RETRY_MAX_ATTEMPTS="1") as live:
        live.gemini.faults.add("503", count=1)
        record = await live.discord.send_interaction("ask", {"prompt": "reply with 300 characters"})
        await live.discord.wait_until(lambda: bool(record.followups), timeout=5)
        assert texts.ACK_MARK in record.texts()[-1]
        [message] = await wait_written(live, record.id, timeout=15)
        asker = live.discord.users["normal"]
        assert marks.strip(message.content).startswith(f"<@{asker}> You asked earlier")
        assert message.custom_ids == [] and message.edits  # streamed, and no button at the end


async def test_an_interrupted_answer_is_queued_at_once_even_when_discord_refuses_the_note(
    tmp_path: Path,
) -> None:
    """The stream fails part-way while Discord answers 503 to every edit: the note cannot be shown,
    which holds nothing up: the user is told the question is queued within seconds (the note is
    tried once, not in a loop)."""
    async with streaming_bot(tmp_path, RETRY_MAX_ATTEMPTS="1", BREAKER_FAIL_MAX="50") as live:
        live.gemini.tokens_per_second = 200
        live.gemini.faults.add("stream_error", count=1, after=3)
        question = await live.say("reply with 600 characters")
        await live.wait_replies(question["id"], timeout=5)  # the first words
        live.discord.faults.add("503", "edit")
        await live.discord.wait_until(
            lambda: any(m.content.startswith(texts.ACK_MARK) for m in live.replies_to(question["id"])),
            timeout=5,
        )
