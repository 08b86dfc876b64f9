"""Intake (``on_message``) on dpytest's fake Discord: who the bot answers, and how it refuses.

The real ``GeminiBot`` with its real services (``tests/bot/dpytest_support.py``) answers through
the sandbox Gemini; dpytest stands in for Discord, so each message is handled in milliseconds.
Time is the bot's ``SteppedClock``: a test steps it past a window instead of waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import discord
import discord.ext.test as dpytest
import pytest

from bot import texts
from sandbox.gemini import GeminiEmulator
from tests.bot.dpytest_support import GEMINI_KEY, FakeDiscord, dpytest_bot

ECHO = "Echo (saw"  # the sandbox Gemini's answer to anything it has no canned reply for
COOLDOWN = "faster than I can keep up"


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiEmulator]:
    """The sandbox Gemini on a free loopback port."""
    async with GeminiEmulator(api_key=GEMINI_KEY) as emulator:
        yield emulator


@pytest.fixture
async def fake(tmp_path: Path, gemini: GeminiEmulator) -> AsyncIterator[FakeDiscord]:
    """The bot on dpytest with the test-sized settings (no rate limit gets in the way)."""
    async with dpytest_bot(tmp_path, gemini) as fake:
        yield fake


async def answered(fake: FakeDiscord, message: discord.Message) -> bool:
    """Whether the bot answered ``message`` (through Gemini) and sent nothing else."""
    sent = fake.sent()
    return len(sent) == 1 and sent[0].content.startswith(ECHO) and message.content[-5:] in sent[0].content


# -- who the bot answers -----------------------------------------------------------------------


async def test_a_dm_is_answered(fake: FakeDiscord) -> None:
    dm = await fake.alice.create_dm()
    message = await fake.say("hello there", channel=dm)
    assert await answered(fake, message)


async def test_a_mention_in_a_channel_is_answered(fake: FakeDiscord) -> None:
    message = await fake.say(f"{fake.mention()} what is up")
    assert message.mentions == [fake.guild.me]
    assert await answered(fake, message)


async def test_a_reply_to_the_bot_is_answered_without_a_mention(fake: FakeDiscord) -> None:
    await fake.say(f"{fake.mention()} first")
    [bot_message] = fake.sent()
    reply = await fake.say("and then", reply_to=bot_message)
    assert await answered(fake, reply)


async def test_every_message_in_a_configured_chat_channel_is_answered(fake: FakeDiscord) -> None:
    message = await fake.say("no mention needed here", channel=fake.chat)
    assert await answered(fake, message)


@pytest.mark.parametrize("who", ["robo", "the bot itself"])
async def test_bots_and_the_bot_itself_are_ignored_even_when_they_mention_it(
    fake: FakeDiscord, who: str
) -> None:
    author = fake.robo if who == "robo" else fake.guild.me
    await fake.say(f"{fake.mention()} hello", author=author)
    await fake.say("in the chat channel", channel=fake.chat, author=author)
    assert fake.sent() == []
    assert len(fake.gemini.requests) == 0


async def test_a_message_in_an_unrelated_channel_without_a_mention_is_ignored(fake: FakeDiscord) -> None:
    """Not a DM, no mention, not a reply to the bot, not a chat channel: not for the bot."""
    other_message = await fake.say("hello", channel=fake.random, author=fake.bob)
    await fake.say("just talking", channel=fake.random, reply_to=other_message)
    assert fake.sent() == []
    assert len(fake.gemini.requests) == 0


# -- refusals ------------------------------------------------------------------------------------


async def test_a_message_over_the_limit_gets_the_too_long_sentence_and_reaches_no_model(
    tmp_path: Path, gemini: GeminiEmulator
) -> None:
    async with dpytest_bot(tmp_path, gemini, MAX_INPUT_CHARS="50") as fake:
        await fake.say(f"{fake.mention()} " + "x" * 51)
        [notice] = fake.sent()
        assert notice.content == texts.too_long(51, 50)
        assert len(gemini.requests) == 0


async def test_an_empty_mention_gets_the_how_to_sentence(fake: FakeDiscord) -> None:
    await fake.say(fake.mention())
    [notice] = fake.sent()
    assert notice.content == texts.empty_mention()
    assert len(fake.gemini.requests) == 0


async def test_repeated_too_long_messages_get_one_notice_then_a_few_reactions_then_nothing(
    tmp_path: Path, gemini: GeminiEmulator
) -> None:
    """Ten too-long messages at once: one sentence, three 📏 reactions, six left alone; a window
    (60 s on the bot's clock) later the sentence comes again."""
    async with dpytest_bot(tmp_path, gemini, MAX_INPUT_CHARS="50") as fake:
        posted = [fake.post(f"{fake.mention()} {i} " + "x" * 60) for i in range(10)]
        await dpytest.run_all_events()
        [notice] = fake.sent()
        assert notice.content.startswith("Your message is")
        ruler = texts.refusal_reaction(texts.TOO_LONG)
        assert [fake.reactions(m) for m in posted] == [[]] + [[ruler]] * 3 + [[]] * 6

        fake.clock.advance(60)
        await fake.say(f"{fake.mention()} again " + "x" * 60)
        [again] = fake.sent()
        assert again.content.startswith("Your message is")


async def test_twenty_dms_at_once_get_one_cooldown_notice_three_reactions_and_then_silence(
    tmp_path: Path, gemini: GeminiEmulator
) -> None:
    """USER_RATE_LIMIT_PER_MINUTE=3: of 20 DMs handled concurrently, 3 are answered, the 4th gets
    the cooldown notice, the next 3 a 🐢, the rest nothing; after the window the user is answered
    again and a refusal gets the notice again."""
    async with dpytest_bot(tmp_path, gemini, USER_RATE_LIMIT_PER_MINUTE="3") as fake:
        dm = await fake.alice.create_dm()
        posted = [fake.post(f"question {i}", channel=dm) for i in range(20)]
        await dpytest.run_all_events()
        sent = [m.content for m in fake.sent()]
        assert [c for c in sent if COOLDOWN in c] == [texts.cooldown(60)]
        assert sum(c.startswith(ECHO) for c in sent) == 3 and len(sent) == 4
        turtle = texts.refusal_reaction(texts.COOLDOWN)
        assert [fake.reactions(m) for m in posted] == [[]] * 4 + [[turtle]] * 3 + [[]] * 13
        assert len(gemini.requests) == 3

        fake.clock.advance(60)
        posted = [fake.post(f"later {i}", channel=dm) for i in range(4)]
        await dpytest.run_all_events()
        sent = [m.content for m in fake.sent()]
        assert sum(c.startswith(ECHO) for c in sent) == 3
        assert [c for c in sent if COOLDOWN in c] == [texts.cooldown(60)]
        assert [fake.reactions(m) for m in posted] == [[]] * 4
