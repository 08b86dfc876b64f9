"""Exactly once after a crash, with what Discord really returns.

Discord keeps a message's nonce only in its create response (never in history), and a reply to a
deleted question, or a late ``/ask`` answer, has no reference. The emulator does the same now
(``tests/sandbox/test_discord_emulator.py``). A bot killed after Discord posted an answer but
before it heard back must still recognise that answer after a restart past Discord's nonce
window: by the invisible mark each answer chunk carries (``bot.marks``), read back from history.

Real ``python -m bot run`` children, SIGKILLed (the harness of ``tests/chaos``); the nonce window
is shortened to 0.5 s so the restart comes after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bot import marks
from bot.texts import ACK_MARK
from sandbox.discord_emu import DiscordEmulator, SentMessage
from sandbox.responder import prose_and_code
from tests.chaos.support import started_bot
from tests.chaos.test_crash_chaos import kill_9, outage_env, stop
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators


def answers_to(discord: DiscordEmulator, channel: int, question: str) -> list[SentMessage]:
    """The bot's answers in ``channel`` that quote ``question`` (late answers do), acks excluded."""
    return [
        m for m in discord.sent_messages(channel)
        if question in m.content and not m.content.startswith(ACK_MARK) and not m.deleted
    ]


async def late_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorten Discord's nonce window and let it pass: only the bot's own look back can help."""
    monkeypatch.setattr("sandbox.discord_emu.NONCE_WINDOW_SECONDS", 0.5)
    await asyncio.sleep(0.6)


async def post_then_kill(emulators: Emulators, first: Any, posted: Any) -> None:
    """Gemini heals; Discord posts the drain's answer but holds its response; SIGKILL meanwhile."""
    discord, gemini = emulators.discord, emulators.gemini
    discord.faults.add("latency", "send", count=1, seconds=3.0, after=True)
    gemini.faults.clear()
    await discord.wait_until(posted, timeout=10)
    await kill_9(first, emulators)
    discord.faults.clear()


async def test_an_answer_to_a_question_deleted_meanwhile_is_posted_once_across_a_late_restart(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The question is queued (Gemini down), then its author deletes it: the answer goes out as a
    plain message (no reference), and the process dies before it hears back. The restarted bot
    finds the answer by its mark and does not post it again."""
    discord, gemini = emulators.discord, emulators.gemini
    general = discord.channels["general"]
    env = outage_env(bot_env)
    text = "a question I deleted"
    async with started_bot(spawn_bot, emulators, env) as first:
        gemini.faults.add("503")
        question = await discord.send_user_message(general, "normal", text, mentions_bot=True)
        await discord.wait_until(lambda: bool(discord.sent_messages(general)), timeout=10)  # the ack
        await discord.delete_message(general, int(question["id"]))
        await post_then_kill(emulators, first, lambda: bool(answers_to(discord, general, text)))
    [answer] = answers_to(discord, general, text)
    [stored] = [m for m in discord.world.messages[general] if m["id"] == str(answer.id)]
    assert "message_reference" not in stored  # posted as a plain message, as Discord does
    assert marks.read(answer.content) == (int(question["id"]), 0)

    await late_restart(monkeypatch)
    async with started_bot(spawn_bot, emulators, env) as second:
        await discord.wait_until(lambda: bool(discord.requests_for("history")), timeout=10)
        await asyncio.sleep(1.5)  # drain intervals: a second answer would show up by now
        assert len(answers_to(discord, general, text)) == 1
        await stop(second)


async def test_a_queued_ask_answered_late_is_posted_once_across_a_late_restart(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/ask while Gemini is down: the follow-up says it is queued; the drain posts the late answer
    in the channel (an interaction is no message to reply to), and the process dies before it
    hears back. The restarted bot finds it by its mark and does not post it again."""
    discord, gemini = emulators.discord, emulators.gemini
    general = discord.channels["general"]
    env = outage_env(bot_env)
    text = "asked with a slash command"
    async with started_bot(spawn_bot, emulators, env) as first:
        gemini.faults.add("503")
        record = await discord.send_interaction("ask", {"prompt": text})
        await discord.wait_until(lambda: bool(record.followups), timeout=10)
        assert ACK_MARK in record.texts()[-1]
        await post_then_kill(emulators, first, lambda: bool(answers_to(discord, general, text)))
    [answer] = answers_to(discord, general, text)
    assert answer.message_reference is None or not discord.world.find_message(
        general, int(answer.message_reference["message_id"])
    )
    assert marks.read(answer.content) == (record.id, 0)

    await late_restart(monkeypatch)
    async with started_bot(spawn_bot, emulators, env) as second:
        await discord.wait_until(lambda: bool(discord.requests_for("history")), timeout=10)
        await asyncio.sleep(1.5)
        assert len(answers_to(discord, general, text)) == 1
        await stop(second)


async def test_a_long_answer_cut_by_a_kill_resumes_after_the_posted_chunks_after_a_late_restart(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 6,000-character answer goes out in several chunks; Discord posts the first and the bot is
    killed before it hears back. The restart comes after the nonce window: the drain reads the
    first chunk's mark, skips it, and delivers the rest, each chunk once. (Under LONG_ANSWER_CHARS, so
    it goes as chat messages, not as a file: tests/integration/test_answer_files.py.)"""
    discord = emulators.discord
    general = discord.channels["general"]
    env = {**outage_env(bot_env), "LONG_ANSWER_CHARS": "100000"}
    async with started_bot(spawn_bot, emulators, env) as first:
        discord.faults.add("latency", "send", count=1, seconds=3.0, after=True)
        question = await discord.send_user_message(
            general, "normal", "reply with 6000 characters of code", mentions_bot=True
        )
        await discord.wait_until(lambda: len(discord.sent_messages(general)) == 1, timeout=10)
        await kill_9(first, emulators)
        discord.faults.clear()

    await late_restart(monkeypatch)
    async with started_bot(spawn_bot, emulators, env) as second:
        expected = len(prose_and_code(6000))

        def delivered() -> int:
            return sum(len(marks.strip(m.content)) for m in discord.sent_messages(general))

        await discord.wait_until(lambda: delivered() >= expected - 50, timeout=15)
        await asyncio.sleep(1.0)
        chunks = [marks.read(m.content) for m in discord.sent_messages(general)]
        assert chunks == [(int(question["id"]), i) for i in range(len(chunks))], chunks  # each once
        await stop(second)
