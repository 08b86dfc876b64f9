"""A channel whose history the bot may not read: the drain's look-back is refused, not broken.

Before answering a question a dead process left claimed, the drain looks through the channel's
history for an answer that process may have posted. Without Read Message History there, Discord
refuses the read (403, code 50001, Missing Access; the emulator does the same). That is "could
not look", not an outage: each such question is answered once, and the ``discord.read`` breaker,
which guards every read of every channel, stays closed.
"""

from __future__ import annotations

import time
from pathlib import Path

from bot.inbound import Inbound
from resilience.degradation import ItemKind
from sandbox.discord_state import READ_MESSAGE_HISTORY
from services.storage import SqliteStore
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import live_bot


async def test_refused_look_backs_answer_each_left_claim_once_and_leave_the_read_breaker_closed(
    tmp_path: Path,
) -> None:
    async with running_emulators() as emus:
        discord = emus.discord
        hidden, readable = discord.channels["random"], discord.channels["general"]
        discord.world.set_overwrite(hidden, discord.bot_user_id, deny=READ_MESSAGE_HISTORY)
        asked = [
            (hidden, "first where I cannot look"),
            (hidden, "second where I cannot look"),
            (readable, "one where I can look"),
        ]
        questions = []
        user = discord.users["normal"]
        async with SqliteStore(tmp_path / "data" / "bot.sqlite3") as store:  # a dead process's claims
            for channel, text in asked:
                question = await discord.send_user_message(channel, "normal", text, mentions_bot=True)
                inbound = Inbound(int(question["id"]), channel, discord.guild_id, user, text)
                await store.accept(
                    inbound.message_id, ItemKind.INBOUND, inbound.key, inbound.payload(),
                    now=time.time(), lease_seconds=600, claim=True,
                )
                questions.append(question)
        # One counted failure would open a breaker: a refused read must not count.
        async with live_bot(emus, tmp_path / "data", BREAKER_FAIL_MAX="1") as live:
            for question in questions:
                channel = int(question["channel_id"])
                [answer] = await live.wait_replies(
                    question["id"], channel=channel, answers_only=True, timeout=10
                )
                assert question["content"].split("> ")[-1] in answer.content
            looked = [(r.path.split("/")[4], r.status) for r in discord.requests_for("history")]
            assert sorted(looked) == sorted([(str(hidden), 403), (str(hidden), 403), (str(readable), 200)])
            assert live.app.board["discord.read"].state.value == "closed"
            for question in questions:  # and none twice
                assert len(live.replies_to(question["id"], int(question["channel_id"]))) == 1
