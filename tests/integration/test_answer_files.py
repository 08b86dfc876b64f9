"""Answers too long for chat arrive as a short message plus a file, through the same durable delivery.

In-process (real discord.py and google-genai against the emulators): a 20,000-character answer is one
message with ``answer.md``; big code blocks go as files named for their language; a file send whose
response is lost is resent under its nonce and posted once; ``/ask`` attaches it to the follow-up.
Then the real bot child, SIGKILLed after Discord posted the file but before it heard back, restarted
after Discord's nonce window: the answer's mark says it is out, and it is not posted again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import marks
from bot.texts import ACK_MARK
from resilience.degradation import ItemState
from sandbox.discord_emu import ATTACH_FILES, DiscordEmulator, SentMessage
from sandbox.responder import prose_and_code, words_of_length
from tests.chaos.support import started_bot
from tests.chaos.test_crash_chaos import kill_9, outage_env, stop
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators, running_emulators
from tests.integration.test_exactly_once import late_restart
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import run

TWENTY_THOUSAND = words_of_length(20_000)
# Room for a 20,000-character answer (5,000 tokens; the default of 2,048 tokens stops near 8,000).
LONG = {"GEMINI_MAX_OUTPUT_TOKENS": "8192", "GEMINI_TOKENS_PER_SECOND": "100000"}


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with (
        running_emulators(heartbeat_interval=1.0) as emus,
        live_bot(emus, tmp_path / "data", **LONG) as bot,
    ):
        yield bot


def with_files(discord: DiscordEmulator, channel: int) -> list[SentMessage]:
    return [m for m in discord.sent_messages(channel) if m.files and not m.deleted]


async def test_a_20000_character_answer_arrives_as_a_short_message_plus_answer_md(live: Live) -> None:
    asked = await live.say("reply with 20000 characters")
    [answer] = await live.wait_replies(asked["id"])
    await asyncio.sleep(0.3)
    assert live.replies_to(asked["id"]) == [answer] and len(live.sent()) == 1  # one message, no more
    assert answer.files == {"answer.md": (TWENTY_THOUSAND + "\n").encode()}
    text = marks.strip(answer.content)
    assert len(answer.content) < 1400
    assert text.startswith(TWENTY_THOUSAND[:1000]) and text.endswith(
        "\u2026\n\n\U0001f4ce The whole answer (20,000 characters) is in the attached `answer.md`."
    )
    assert marks.read(answer.content) == (int(asked["id"]), 0)
    [attachment] = answer.payload["attachments"]
    assert (attachment["filename"], attachment["size"]) == ("answer.md", 20_001)
    # The answer, not its opening, is the conversation's history (cut to HISTORY_MAX_CHARS, as ever).
    [*_, stored] = await live.app.storage.history(str(live.general))
    assert stored.role == "model" and stored.text.startswith(TWENTY_THOUSAND[:11_000])


async def test_big_code_blocks_go_as_files_named_for_their_language(tmp_path: Path) -> None:
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", CODE_FILE_CHARS="500") as live,
    ):
        asked = await live.say("reply with 3000 characters of code")
        [answer] = await live.wait_replies(asked["id"])
        blocks = prose_and_code(3000).count("```python")
        assert list(answer.files) == [f"snippet-{n}.py" for n in range(1, blocks + 1)]
        assert answer.files["snippet-1.py"].decode().startswith("value_0_0 = 0 * 2  # line 0 of block 0\n")
        assert "```" not in answer.content
        assert "`snippet-1.py` (30 lines of python, attached)" in answer.content


async def test_where_the_bot_may_not_attach_files_a_long_answer_goes_as_chat_messages(tmp_path: Path) -> None:
    async with running_emulators() as emus:
        random = emus.discord.channels["random"]
        emus.discord.world.set_overwrite(random, emus.discord.bot_user_id, deny=ATTACH_FILES)
        async with live_bot(emus, tmp_path / "data", **LONG) as live:
            asked = await live.say("reply with 20000 characters", channel=random)
            await live.discord.wait_until(
                lambda: sum(len(marks.strip(m.content)) for m in live.sent(random)) >= 19_900, 10
            )
            sent = live.sent(random)
            assert len(sent) == 11 and not any(m.files for m in sent)
            assert " ".join(marks.strip(m.content) for m in sent).split() == TWENTY_THOUSAND.split()
            assert live.replies_to(asked["id"], random) == sent[:1]


async def test_a_file_send_whose_response_is_lost_is_resent_once_never_twice(live: Live) -> None:
    """Discord posts the message with its file, and the connection drops before the bot hears back:
    the answer waits in the outbound queue with its file, the drain resends it under the same nonce,
    and Discord returns the message it already has."""
    live.discord.faults.add("drop", "send", count=1, after=True)
    asked = await live.say("reply with 20000 characters")
    await live.discord.wait_until(lambda: len(live.discord.requests_for("send")) >= 2, 15)

    async def done() -> bool:
        return [i.state for i in await live.app.storage.list()] == [ItemState.DONE]

    async with asyncio.timeout(10):
        while not await done():
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    [answer] = with_files(live.discord, live.general)
    assert answer.files == {"answer.md": (TWENTY_THOUSAND + "\n").encode()}
    assert live.replies_to(asked["id"]) == [answer]
    sends = live.discord.requests_for("send")
    assert len(sends) == 2 and sends[0].json["nonce"] == sends[1].json["nonce"] == f"{asked['id']}.0"
    assert [u["filename"] for u in sends[1].json["__uploads__"]] == ["answer.md"]  # resent with its file


async def test_ask_attaches_the_file_to_its_follow_up(live: Live) -> None:
    live.bot.install_commands()
    await live.bot.tree.sync()
    record = await run(live, "ask", {"prompt": "reply with 20000 characters"})
    [answer] = record.followups
    assert answer.files == {"answer.md": (TWENTY_THOUSAND + "\n").encode()}
    assert "is in the attached `answer.md`" in answer.content


async def test_a_file_answer_posted_by_a_killed_bot_is_not_posted_again_after_a_late_restart(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The question is queued (Gemini down); when Gemini is back, the drain's answer (a message with
    answer.md) is posted but Discord holds its response, and the bot is SIGKILLed meanwhile. The
    restart comes after Discord's nonce window: the drain finds the answer by its mark and completes
    the item without posting it, or its file, again."""
    discord, gemini = emulators.discord, emulators.gemini
    general = discord.channels["general"]
    env = {**outage_env(bot_env), **LONG}
    async with started_bot(spawn_bot, emulators, env) as first:
        gemini.faults.add("503")
        question = await discord.send_user_message(
            general, "normal", "reply with 20000 characters", mentions_bot=True
        )
        await discord.wait_until(lambda: bool(discord.sent_messages(general)), timeout=10)
        assert discord.sent_messages(general)[0].content.startswith(ACK_MARK)
        discord.faults.add("latency", "send", count=1, seconds=3.0, after=True)
        gemini.faults.clear()
        await discord.wait_until(lambda: bool(with_files(discord, general)), timeout=15)
        await kill_9(first, emulators)
        discord.faults.clear()
    [answer] = with_files(discord, general)
    assert marks.read(answer.content) == (int(question["id"]), 0)

    await late_restart(monkeypatch)
    async with started_bot(spawn_bot, emulators, env) as second:
        await discord.wait_until(lambda: bool(discord.requests_for("history")), timeout=10)
        await asyncio.sleep(1.5)  # drain intervals: a second copy would show up by now
        assert with_files(discord, general) == [answer]
        assert len([m for m in discord.sent_messages(general) if not m.content.startswith(ACK_MARK)]) == 1
        await stop(second)
    first.proc.assert_clean_logs()
    second.proc.assert_clean_logs()
