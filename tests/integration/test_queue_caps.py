"""Caps on waiting work reach the user as one clear sentence, in messages and in ``/ask``.

While Gemini is down every message waits in the durable queue. ``QUEUE_MAX_PENDING_PER_USER=2``:
a user's first two are saved and acknowledged; the third is not saved and its author is told
why (once per window: a fourth gets a reaction instead); once Gemini is back the two saved
ones are answered, nothing else.
"""

from __future__ import annotations

from pathlib import Path

from bot.texts import ACK_MARK
from resilience.degradation import ItemState
from tests.integration.test_drain import start, states
from tests.integration.test_slash_commands import run


async def test_a_users_messages_over_the_pending_cap_are_refused_with_a_sentence_and_not_saved(
    tmp_path: Path,
) -> None:
    settings = {"QUEUE_MAX_PENDING_PER_USER": "2", "BREAKER_FAIL_MAX": "1", "RETRY_MAX_ATTEMPTS": "1"}
    async with start(tmp_path, **settings) as live:
        live.gemini.faults.add("503")
        saved = []
        for n in range(2):
            msg = await live.say(f"question {n}")
            [ack] = await live.wait_replies(msg["id"])
            assert ack.content.startswith(ACK_MARK), ack.content
            saved.append(msg)
        third = await live.say("question 2")
        [told] = await live.wait_replies(third["id"])
        assert told.content.startswith("You already have 2 messages waiting for an answer"), told.content
        fourth = await live.say("question 3")
        await live.discord.wait_until(lambda: bool(live.discord.reactions(int(fourth["id"]))), 5)
        assert live.replies_to(fourth["id"]) == []
        assert await states(live) == [ItemState.PENDING, ItemState.PENDING]

        live.bot.install_commands()
        await live.bot.tree.sync()
        record = await run(live, "ask", {"prompt": "one more"})
        assert "You already have 2 messages waiting" in record.texts()[-1]
        assert len(await states(live)) == 2

        live.gemini.faults.clear()
        for n, msg in enumerate(saved):
            [answer] = await live.wait_replies(msg["id"], answers_only=True, timeout=10)
            assert f"question {n}" in answer.content, answer.content
        assert [r for r in live.gemini.requests if "question 2" in str(r.body)] == []
