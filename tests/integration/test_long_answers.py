"""Long answers and poison questions must not hold Gemini's breaker open for everyone.

A review reproduced it: after a dozen quick answers the adaptive timeout sat at its 2 s floor,
two requests for an essay timed out, opened the breaker, and each half-open probe retried the
same slow item, so the breaker flapped for as long as the item lived while everybody else got
"queued". Three causes, three tests: the answer is bounded (``GEMINI_MAX_OUTPUT_TOKENS``), the
timeout never drops below what the longest allowed answer takes, and a question that times out
as the breaker's probe counts the attempt, is not the probe again while fresher questions wait,
and is dead-lettered (its user told) after ``QUEUE_MAX_ATTEMPTS`` while the others are answered.

The sandbox Gemini writes at ``tokens_per_second`` (a long answer is slow, as with the real API),
and its ``prompt=`` faults hit one question only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.texts import ACK_MARK
from resilience.breakers import BreakerState
from resilience.degradation import ItemState
from services.config import ConfigError, load_config
from tests.integration.test_drain import shift_time, start, states


def test_the_timeout_floor_fits_the_longest_answer_and_a_too_short_timeout_is_a_warning() -> None:
    config = load_config(environ={}, env_file=None)
    assert config.gemini_max_output_tokens == 2048
    assert config.gemini_timeout_floor() == pytest.approx(2 + 2048 / 100)
    assert "GEMINI_TIMEOUT_SECONDS" not in [w.name for w in config.warnings]
    short = load_config(environ={"GEMINI_TIMEOUT_SECONDS": "10"}, env_file=None)
    [warning] = [w for w in short.warnings if w.name == "GEMINI_TIMEOUT_SECONDS"]
    assert "long answers will time out" in warning.problem
    with pytest.raises(ConfigError) as info:
        load_config(environ={"GEMINI_MAX_OUTPUT_TOKENS": "0", "GEMINI_TOKENS_PER_SECOND": "0"}, env_file=None)
    assert [p.name for p in info.value.problems] == ["GEMINI_MAX_OUTPUT_TOKENS", "GEMINI_TOKENS_PER_SECOND"]


async def test_every_gemini_request_carries_the_max_output_tokens_setting(tmp_path: Path) -> None:
    async with start(tmp_path, GEMINI_MAX_OUTPUT_TOKENS="321") as live:
        msg = await live.say("hello")
        await live.wait_replies(msg["id"], answers_only=True)
        [request] = [r for r in live.gemini.requests if r.action == "generateContent"]
        assert request.body["generationConfig"]["maxOutputTokens"] == 321


async def test_a_long_answer_after_a_dozen_quick_ones_is_answered_not_cut_by_the_timeout(
    tmp_path: Path,
) -> None:
    """Twelve quick answers teach the adaptive timeout that Gemini answers in milliseconds; the
    essay that follows takes 3 s to write (3,000 tokens at 1,000 tokens/s). Its timeout may not
    drop below 2 s + 4,000 tokens / 1,000 tokens/s = 6 s, so it is answered (it used to time out at
    the old 2 s floor on every attempt and be queued)."""
    settings = {
        "GEMINI_TIMEOUT_SECONDS": "10",
        "GEMINI_MAX_OUTPUT_TOKENS": "4000",
        "GEMINI_TOKENS_PER_SECOND": "1000",
        "PROCESSING_TIMEOUT_SECONDS": "20",
    }
    async with start(tmp_path, **settings) as live:
        live.gemini.tokens_per_second = 1000
        assert live.app.gemini.timeout.minimum == 6.0
        for n in range(12):
            msg = await live.say(f"quick {n}")
            await live.wait_replies(msg["id"], answers_only=True)
        assert live.app.gemini.timeout.current() == 6.0
        essay = await live.say("reply with 12000 characters")
        [first, *_] = await live.wait_replies(essay["id"], answers_only=True, timeout=15)
        assert first.content.startswith("lorem ipsum"), first.content
        assert not [m for m in live.replies_to(essay["id"]) if m.content.startswith(ACK_MARK)]
        assert live.app.board["gemini"].state is BreakerState.CLOSED


async def test_a_question_that_always_times_out_is_dead_lettered_and_the_breaker_closes_for_everyone(
    tmp_path: Path,
) -> None:
    """Two essays (one in #general, one in #random) hang at Gemini every time and open its breaker
    (two failures). A question in a DM, asked while the breaker is open, is its half-open probe
    (it has failed least), succeeds and closes the breaker; the essays keep timing out, each
    failure counts, and after QUEUE_MAX_ATTEMPTS=3 each is dead-lettered with a notice to its
    user. Alice, who writes afterwards, is answered directly."""
    settings = {
        "BREAKER_FAIL_MAX": "2",
        "BREAKER_RESET_SECONDS": "0.2",
        "RETRY_MAX_ATTEMPTS": "1",
        "QUEUE_MAX_ATTEMPTS": "3",
        "GEMINI_TIMEOUT_SECONDS": "1",
    }
    async with start(tmp_path, **settings) as live:
        clock = shift_time(live)
        live.gemini.faults.add("hang", prompt="write an essay")
        random = live.discord.channels["random"]
        essays = [
            await live.say("write an essay about rivers"),
            await live.say("write an essay about mountains", channel=random),
        ]
        for essay, channel in zip(essays, (None, random), strict=True):
            [ack] = await live.wait_replies(essay["id"], channel=channel, timeout=10)
            assert ack.content.startswith(ACK_MARK), ack.content
        assert live.app.board["gemini"].state is not BreakerState.CLOSED

        dm = live.discord.dm_channel("normal")
        question = await live.say("what are you", channel=dm, mention=False)
        [answer] = await live.wait_replies(question["id"], channel=dm, answers_only=True, timeout=10)
        assert "loopback emulator of the Gemini API" in answer.content

        async def essays_dead() -> bool:
            return [i.state for i in await live.app.storage.list() if "essay" in i.payload["content"]] == [
                ItemState.DEAD,
                ItemState.DEAD,
            ]

        for _ in range(200):  # each essay's backoff (2 s, 4 s) is skipped by moving the clock
            if await essays_dead():
                break
            clock.advance(10)
            await asyncio.sleep(0.1)
        assert await essays_dead(), await states(live)
        for essay, channel in zip(essays, (None, random), strict=True):
            told = await live.wait_replies(essay["id"], 2, channel=channel, timeout=10)
            assert "tried 3 times" in told[-1].content, [m.content for m in told]

        # The essays' last timeouts may have opened the breaker again; nothing holds it open now:
        # once its reset time (0.2 s) has passed, the next question is its probe and is answered.
        gemini = live.app.board["gemini"]
        await live.discord.wait_until(gemini.would_admit, 5)
        alice = await live.say("hello", author="admin")
        [direct] = await live.wait_replies(alice["id"], timeout=10)
        assert direct.content.startswith("Hello! I am the sandbox Gemini"), direct.content
        assert live.app.board["gemini"].state is BreakerState.CLOSED
