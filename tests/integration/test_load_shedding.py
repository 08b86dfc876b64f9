"""Load shedding and the load test, in-process: the real bot against the emulators.

``Operations.load_shed`` tightens the rate limits at run time and can queue new messages (saved,
acknowledged at once, answered by the drain); ``load_restore`` undoes it. ``load_test`` sends
a bounded load of Gemini test prompts and refuses a live bot without confirmation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from bot import texts
from bot.app import build_application
from bot.operations import ConfirmationRequiredError, InvalidRequestError, Operations, talks_to_real_services
from bot.texts import ACK_MARK
from services.config import load_config
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with running_emulators(heartbeat_interval=1.0) as emus, live_bot(emus, tmp_path / "data") as bot:
        yield bot


async def test_queueing_new_messages_acknowledges_at_once_and_the_drain_answers(live: Live) -> None:
    """While new messages are queued, a message gets the "answering a lot" acknowledgement with
    its queue position, then its answer from the queue; after the restore, answers are live again."""
    ops = live.bot.operations
    shed = await ops.load_shed(queue_new_messages=True, by="test")
    assert shed["queue_new_messages"] and shed["shedding"] and shed["changed_at"] is not None
    msg = await live.say("hello")
    ack, answer = await live.wait_replies(msg["id"], 2)
    assert ack.content == texts.queued_load(1) and ack.content.startswith(ACK_MARK)
    assert answer.content.startswith(texts.late_answer_prefix("hello"))  # the drain's answer

    restored = await ops.load_restore(by="test")
    assert not restored["shedding"] and not restored["queue_new_messages"]
    msg = await live.say("hello")
    [answer] = await live.wait_replies(msg["id"])
    assert not answer.content.startswith(ACK_MARK)


async def test_tightened_rate_limits_hold_at_once_and_restore(live: Live) -> None:
    """One message a minute per user: the second gets the cooldown notice; restored, it is answered."""
    ops = live.bot.operations
    shed = await ops.load_shed(user_per_minute=1, by="test")
    assert (shed["user_per_minute"], shed["configured_user_per_minute"]) == (1, 1000)
    first = await live.say("hello")
    await live.wait_replies(first["id"])
    second = await live.say("hello again")
    [notice] = await live.wait_replies(second["id"])
    assert notice.content.startswith("You're sending messages faster than I can keep up with."), notice
    with pytest.raises(InvalidRequestError):
        await ops.load_shed(user_per_minute=0)
    with pytest.raises(InvalidRequestError):
        await ops.load_shed(queue_new_messages="yes")  # type: ignore[arg-type]
    await ops.load_restore()
    third = await live.say("third")
    [answer] = await live.wait_replies(third["id"])
    assert "third" in answer.content


async def test_load_test_against_the_sandbox_reports_percentiles(live: Live) -> None:
    """12 prompts, 3 at a time: all answered, latency percentiles over 12 samples; bounds are checked."""
    ops = live.bot.operations
    result = await ops.load_test(12, 3, by="test")
    assert (result["ok"], result["errors"], result["unfinished"], result["live"]) == (12, 0, 0, False)
    latency = result["latency"]
    assert latency["count"] == 12 and 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert len(live.gemini.requests) >= 12
    for bad in ((0, 1), (501, 1), (1, 21), (True, 1)):
        with pytest.raises(InvalidRequestError):
            await ops.load_test(*bad)  # type: ignore[arg-type]


async def test_a_live_bot_refuses_a_load_test_without_confirmation(tmp_path: Path) -> None:
    """A bot whose Gemini is Google's (no GEMINI_BASE_URL) is live: no request is sent without
    ``confirm`` (nothing here is started, so nothing could be)."""
    config = load_config(environ={"DATA_DIR": str(tmp_path / "data")}, env_file=None)
    assert talks_to_real_services(config)
    sandbox = replace(
        config, gemini_base_url="http://127.0.0.1:9/", discord_api_base="http://localhost:9/api/v10"
    )
    assert not talks_to_real_services(sandbox)
    assert talks_to_real_services(replace(sandbox, discord_api_base="https://discord.com/api/v10"))
    ops = Operations(build_application(config))
    with pytest.raises(ConfirmationRequiredError, match="live bot"):
        await ops.load_test(5, 1)
