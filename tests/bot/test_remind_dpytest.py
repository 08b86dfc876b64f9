"""/remind's delivery on dpytest's fake Discord: a due reminder goes through the outbound queue
and the drain, posted once, pinging its owner only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from sandbox.gemini import GeminiEmulator
from tests.bot.dpytest_support import GEMINI_KEY, FakeDiscord, dpytest_bot


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiEmulator]:
    """The sandbox Gemini on a free loopback port (the bot starts its Gemini service against it)."""
    async with GeminiEmulator(api_key=GEMINI_KEY) as emulator:
        yield emulator


async def posted(fake: FakeDiscord, text: str, *, within: float = 5.0) -> list[discord.Message]:
    """What the bot sent containing ``text``, once something is (or after ``within`` seconds)."""
    found: list[discord.Message] = []
    for _ in range(int(within / 0.02)):
        found += [m for m in fake.sent() if text in m.content]
        if found:
            return found
        await asyncio.sleep(0.02)
    return found


async def test_a_due_reminder_is_posted_once_through_the_drain(
    tmp_path: Path, gemini: GeminiEmulator
) -> None:
    async with dpytest_bot(tmp_path, gemini, PLUGINS="remind") as fake:
        cog: Any = fake.bot.get_cog("Reminders")
        said = await cog.desk.add(
            user_id=fake.alice.id,
            channel_id=fake.general.id,
            guild_id=fake.guild.id,
            source_id=1_200_000_000_000_000_001,
            when="1m",
            text="stretch",
        )
        assert "in 1 minute" in said
        cog.wake()
        assert await posted(fake, "Reminder: stretch", within=0.3) == []  # not due yet
        fake.clock.advance(61)
        cog.wake()
        [message] = await posted(fake, "Reminder: stretch")
        assert message.content.startswith(f"<@{fake.alice.id}> \u23f0 Reminder: stretch")
        assert message.channel.id == fake.general.id
        cog.wake()
        assert await posted(fake, "Reminder: stretch", within=0.3) == []  # once
