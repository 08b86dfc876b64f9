"""Discord reads go through the ``discord.read`` breaker and the call timeout, like the writes.

Before answering a question whose claim a dead process left behind, the drain reads the
channel's history for an answer that process may have posted. A Discord that hangs on that
read used to hold the item until the read ended (or its lease ran out); now the read times out
after ``DISCORD_TIMEOUT_SECONDS``, and not knowing is no reason to stay silent: the question is
answered.
"""

from __future__ import annotations

import time
from pathlib import Path

from bot.inbound import Inbound
from resilience.degradation import ItemKind
from services.storage import SqliteStore
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import live_bot


async def test_a_hanging_history_read_times_out_and_the_left_claim_is_answered(tmp_path: Path) -> None:
    async with running_emulators() as emus:
        question = await emus.discord.send_user_message(
            emus.discord.channels["general"], "normal", "left behind by a crash", mentions_bot=True
        )
        inbound = Inbound(
            int(question["id"]), emus.discord.channels["general"], emus.discord.guild_id,
            emus.discord.users["normal"], "left behind by a crash",
        )
        async with SqliteStore(tmp_path / "data" / "bot.sqlite3") as store:  # a dead process's claim
            await store.accept(
                inbound.message_id, ItemKind.INBOUND, inbound.key, inbound.payload(),
                now=time.time(), lease_seconds=600, claim=True,
            )
        emus.discord.faults.add("latency", "history", seconds=60)
        async with live_bot(emus, tmp_path / "data", DISCORD_TIMEOUT_SECONDS="1") as live:
            [answer] = await live.wait_replies(question["id"], answers_only=True, timeout=8)
            assert "left behind by a crash" in answer.content
            assert len(live.discord.requests_for("history")) == 1
