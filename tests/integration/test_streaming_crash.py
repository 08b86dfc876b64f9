"""Streamed answers across ``kill -9``: the real ``python -m bot run`` child, SIGKILLed mid-answer.

A streamed answer is being written into messages when the process dies. The next process (started
after Discord's nonce window, shortened to 0.5 s, so a resend cannot be caught by its nonce) must
complete those same messages: none posted twice, none left half-written, the final text whole. The
buttons it drew still work in the new process (persistent views with fixed ``custom_id``).
"""

from __future__ import annotations

import asyncio

import pytest

from bot import marks, texts, views
from bot.splitting import split_message
from bot.streaming import PARTIAL, ROOM
from sandbox.discord_emu import DiscordEmulator, SentMessage
from sandbox.responder import code_of_length
from tests.chaos.support import started_bot
from tests.chaos.test_crash_chaos import kill_9, stop
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

QUESTION = "reply with exactly 5000 characters of code"


def answer_messages(discord: DiscordEmulator, channel: int, question_id: int) -> list[SentMessage]:
    """The messages (not deleted) marked as chunks of the answer to ``question_id``, in order."""
    found = []
    for m in discord.sent_messages(channel):
        mark = marks.read(m.content)
        if mark is not None and mark[0] == question_id and not m.deleted:
            found.append(m)
    return found


def written(discord: DiscordEmulator, channel: int, question_id: int) -> bool:
    found = answer_messages(discord, channel, question_id)
    return bool(found) and [marks.read(m.content)[1] for m in found] == list(range(len(found)))  # type: ignore[index]


async def test_kill_9_mid_stream_then_a_late_restart_completes_the_same_messages_and_posts_none_twice(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two messages of a 5,000-character answer are on Discord, still being written, when the bot
    is killed; Discord holds back its answer to the second one's post, so the dying process never
    learnt (nor recorded) that message's id. After the nonce window a new process finds the item
    unanswered (its messages' marks say "being written"), takes both messages up (the first from
    the item, the second from its mark in the channel), writes the answer (late, so it recalls the
    question) into them and posts only the third: three messages, each posted once, fences intact,
    nothing left half-written. Regenerate on the answer, a button the dead process's answer
    carried, works in the new process: the same three messages are edited to a new answer (live,
    without the recall)."""
    discord, gemini = emulators.discord, emulators.gemini
    general = discord.channels["general"]
    env = {**bot_env, "STREAMING": "true", "GEMINI_TIMEOUT_SECONDS": "30", "PROCESSING_TIMEOUT_SECONDS": "40"}
    gemini.tokens_per_second = 250  # 1,250 tokens: 5 s of writing
    async with started_bot(spawn_bot, emulators, env) as first:
        question = await discord.send_user_message(general, "normal", QUESTION, mentions_bot=True)
        qid = int(question["id"])
        await discord.wait_until(lambda: len(answer_messages(discord, general, qid)) >= 1, timeout=15)
        discord.faults.add("latency", "send", count=1, seconds=5.0, after=True)  # posted, answer held
        await discord.wait_until(lambda: len(answer_messages(discord, general, qid)) >= 2, timeout=15)
        shown = answer_messages(discord, general, qid)
        assert all(marks.read(m.content)[1] >= PARTIAL for m in shown)  # type: ignore[index]
        await kill_9(first, emulators)
        discord.faults.clear()
    before = [m.id for m in answer_messages(discord, general, qid)]

    monkeypatch.setattr("sandbox.discord_emu.NONCE_WINDOW_SECONDS", 0.5)
    await asyncio.sleep(0.6)
    gemini.tokens_per_second = 2000
    async with started_bot(spawn_bot, emulators, env) as second:
        await discord.wait_until(lambda: written(discord, general, qid), timeout=20)
        await asyncio.sleep(1.5)  # drain intervals: a duplicate or a late edit would show by now
        messages = answer_messages(discord, general, qid)
        assert [m.id for m in messages][: len(before)] == before
        late = texts.late_answer_prefix(QUESTION) + code_of_length(5000)
        assert [marks.strip(m.content) for m in messages] == split_message(late, limit=ROOM)
        assert len(messages) == 3
        assert [m for m in discord.sent_messages(general) if m.id not in {x.id for x in messages}] == []
        assert messages[-1].custom_ids == [views.REGENERATE_ID]

        click = await discord.click_button(general, messages[-1].id, views.REGENERATE_ID, user="normal")
        fresh = split_message(code_of_length(5000), limit=ROOM)
        await discord.wait_until(
            lambda: [marks.strip(m.content) for m in answer_messages(discord, general, qid)] == fresh
            and written(discord, general, qid),
            timeout=20,
        )
        assert click.callback_type == 6
        again = answer_messages(discord, general, qid)
        assert [m.id for m in again] == [m.id for m in messages]
        assert len(discord.sent_messages(general)) == 3
        await stop(second)
    second.proc.assert_clean_logs()
