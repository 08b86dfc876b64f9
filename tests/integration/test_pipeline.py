"""The whole bot in-process: real discord.py and google-genai clients against the sandbox emulators.

Each test builds one application from a configuration pointed at fresh emulators, logs the
real ``GeminiBot`` in over loopback, plays users through the Discord emulator, and checks
what every user saw (the emulator's record of what the bot sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot import marks, texts
from bot.app import Application, build_application
from bot.client import GeminiBot
from bot.inbound import Inbound
from bot.texts import ACK_MARK
from resilience.breakers import BreakerState
from resilience.clock import Clock
from resilience.degradation import ItemKind, ItemState
from sandbox import responder
from sandbox.discord_emu import DiscordEmulator, SentMessage
from sandbox.gemini import GeminiEmulator
from sandbox.responder import prose_and_code
from services.config import load_config
from services.discord_io import TYPING_DELAY
from tests.integration.harness import TEST_SETTINGS, Emulators, pointed_at, running_emulators


@dataclass
class Live:
    """A running bot and the emulators it talks to."""

    app: Application
    bot: GeminiBot
    discord: DiscordEmulator
    gemini: GeminiEmulator

    @property
    def general(self) -> int:
        return self.discord.channels["general"]

    async def say(self, text: str, *, channel: int | None = None, author: str = "normal", **kw: Any) -> dict:
        return await self.discord.send_user_message(
            channel or self.general, author=author, content=text, mentions_bot=kw.pop("mention", True), **kw
        )

    def sent(self, channel: int | None = None) -> list[SentMessage]:
        return self.discord.sent_messages(channel or self.general)

    def replies_to(self, message_id: int | str, channel: int | None = None) -> list[SentMessage]:
        return [m for m in self.sent(channel) if _ref(m) == str(message_id)]

    async def wait_replies(
        self,
        message_id: int | str,
        count: int = 1,
        *,
        channel: int | None = None,
        timeout: float = 10.0,
        answers_only: bool = False,
    ) -> list[SentMessage]:
        def ready() -> bool:
            found = self.replies_to(message_id, channel)
            if answers_only:
                found = [m for m in found if not m.content.startswith(ACK_MARK)]
            return len(found) >= count

        await self.discord.wait_until(ready, timeout)
        found = self.replies_to(message_id, channel)
        return [m for m in found if not m.content.startswith(ACK_MARK)] if answers_only else found


def _ref(message: SentMessage) -> str | None:
    ref = message.message_reference or {}
    value = ref.get("message_id")
    return None if value is None else str(value)


@contextlib.asynccontextmanager
async def live_bot(
    emus: Emulators, data_dir: Path, *, clock: Clock | None = None, **settings: str
) -> AsyncIterator[Live]:
    """Start a ``GeminiBot`` against ``emus`` (on ``clock``, default the real one); close it (and
    check it closed) on exit."""
    environ = {**emus.settings(), **TEST_SETTINGS, "DATA_DIR": str(data_dir), "LOG_FORMAT": "console"}
    environ.update(settings)
    config = load_config(environ=environ, env_file=None)
    app = build_application(config, clock=clock)
    with pointed_at(emus.discord):
        # No start-up model check: these tests count the Gemini requests messages cause (the
        # check has its own tests in test_gemini_models.py).
        bot = GeminiBot(app, guild_ready_timeout=0.05, drain_interval=0.05, check_models=False)
        task = asyncio.create_task(bot.start(config.discord_token or ""))
        try:
            async with asyncio.timeout(10):
                while not bot.is_ready():
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.01)
            yield Live(app, bot, emus.discord, emus.gemini)
        finally:
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """The bot logged in to fresh emulators, with a data dir of its own."""
    async with running_emulators(heartbeat_interval=1.0) as emus, live_bot(emus, tmp_path / "data") as bot:
        yield bot


# -- happy paths ---------------------------------------------------------------------------


async def test_a_mention_in_a_channel_is_answered_as_a_reply_that_pings_only_the_author(live: Live) -> None:
    msg = await live.say("hello")
    [reply] = await live.wait_replies(msg["id"])
    assert "sandbox Gemini" in reply.content
    assert reply.pings <= {f"user:{live.discord.users['normal']}"}
    assert reply.allowed_mentions is not None and reply.allowed_mentions.get("parse") == []


async def test_messages_not_for_the_bot_get_no_answer(live: Live) -> None:
    await live.say("just chatting", mention=False)
    probe = await live.say("hello")
    await live.wait_replies(probe["id"])
    assert len(live.sent()) == 1


async def test_thread_dm_and_reply_chain_are_answered_and_history_is_used(live: Live) -> None:
    thread = live.discord.thread_id
    first = await live.say("remember the word banana", channel=thread)
    await live.wait_replies(first["id"], channel=thread)
    second = await live.say("what did I say", channel=thread)
    [answer] = await live.wait_replies(second["id"], channel=thread)
    # The emulator's echo reports how many earlier turns it received: the first exchange.
    assert "saw 2 earlier turns" in answer.content

    dm = live.discord.dm_channel("normal")
    in_dm = await live.say("hello", channel=dm, mention=False)
    await live.wait_replies(in_dm["id"], channel=dm)

    bot_message = live.replies_to(first["id"], thread)[0]
    chained = await live.say("and more", channel=thread, mention=False, reference_message_id=bot_message.id)
    await live.wait_replies(chained["id"], channel=thread)


async def test_a_quick_answer_shows_no_typing_indicator_and_a_slow_one_shows_it_before_answering(
    live: Live,
) -> None:
    """The indicator waits TYPING_DELAY: an instant Gemini answer goes out without a typing request;
    one that takes longer than the delay is preceded by one."""
    quick = await live.say("hello")
    await live.wait_replies(quick["id"])
    assert live.discord.typing == []

    live.gemini.faults.add("latency", count=1, seconds=TYPING_DELAY + 0.3)
    slow = await live.say("hello")
    [answer] = await live.wait_replies(slow["id"])
    assert live.discord.typing == [live.general]
    routes = [r.route for r in live.discord.requests if r.route in ("typing", "send")]
    assert routes == ["send", "typing", "send"]  # quick answer; then the indicator before the slow one
    assert "sandbox Gemini" in answer.content


async def test_a_long_answer_with_code_arrives_as_valid_messages_with_fences_intact(tmp_path: Path) -> None:
    """Split into chat messages when it is under LONG_ANSWER_CHARS (over it, it goes as a file:
    tests/integration/test_answer_files.py)."""
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", LONG_ANSWER_CHARS="100000") as live,
    ):
        await _long_code_answer_is_split_with_fences_intact(live)


async def _long_code_answer_is_split_with_fences_intact(live: Live) -> None:
    msg = await live.say("reply with 6000 characters of code")
    await live.wait_replies(msg["id"])
    expected = prose_and_code(6000)
    await live.discord.wait_until(lambda: sum(len(m.content) for m in live.sent()) >= len(expected) - 50, 10)
    chunks = [m.content for m in live.sent()]
    assert len(chunks) >= 4
    assert all(len(c) <= 2000 for c in chunks)
    for chunk in chunks:
        fences = [line for line in chunk.split("\n") if line.startswith("```")]
        assert len(fences) % 2 == 0, chunk[:200]
    words = [w for w in " ".join(chunks).split() if not w.startswith("```")]
    assert words == [w for w in expected.split() if not w.startswith("```")]


async def test_an_answer_containing_everyone_pings_nobody(live: Live) -> None:
    msg = await live.say("@everyone @here <@&123> look")
    [reply] = await live.wait_replies(msg["id"])
    assert "@everyone" in reply.content  # echoed back by the emulator ...
    assert "everyone" not in reply.pings and not any(p.startswith("role:") for p in reply.pings)


# -- clear sentences -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("safety", "safety"), ("prompt_block", "declined|blocked|safety"), ("empty", "empty|no answer|nothing")],
)
async def test_safety_block_and_empty_answers_get_a_clear_sentence(
    live: Live, fault: str, expected: str
) -> None:
    live.gemini.faults.add(fault, count=1)
    msg = await live.say("tell me something")
    [reply] = await live.wait_replies(msg["id"])
    assert re.search(expected, reply.content, re.I), reply.content
    assert "Traceback" not in reply.content


BARE_FENCE_PROMPT = "answer with a bare fence"


@pytest.fixture
def bare_fence_answer(monkeypatch: pytest.MonkeyPatch) -> str:
    """The sandbox Gemini answers ``BARE_FENCE_PROMPT`` with just "```python" (a canned reply)."""
    monkeypatch.setitem(responder.CANNED, BARE_FENCE_PROMPT, "```python")
    return BARE_FENCE_PROMPT


async def test_an_answer_of_only_a_code_fence_gets_the_no_answer_sentence_not_silence(
    live: Live, bare_fence_answer: str
) -> None:
    """Gemini answers "```python": nothing to show, so the user gets the "no answer" sentence, the
    item is finished as refused (not answered) and the empty exchange stays out of the history."""
    msg = await live.say(bare_fence_answer)
    [reply] = await live.wait_replies(msg["id"])
    assert marks.strip(reply.content) == texts.no_answer()  # an answer chunk: it carries its mark
    assert [r.outcome for r in live.gemini.requests] == ["ok"]
    async with asyncio.timeout(5):
        while [i.state for i in await live.app.storage.list()] != [ItemState.DONE]:
            await asyncio.sleep(0.02)
    assert await live.app.storage.history(str(live.general)) == []
    assert live.app.metrics.messages.labels("refused")._value.get() == 1
    assert live.app.metrics.messages.labels("answered")._value.get() == 0


async def test_an_unsaved_answer_of_only_a_code_fence_gets_the_no_answer_sentence(
    live: Live, bare_fence_answer: str
) -> None:
    """Storage is down, so the answer goes out unsaved: the same rule, a sentence and not silence."""
    live.app.board["storage"].force_open(30, reason="test")
    try:
        msg = await live.say(bare_fence_answer)
        [reply] = await live.wait_replies(msg["id"])
    finally:
        live.app.board["storage"].reset()
    assert marks.strip(reply.content) == texts.no_answer()  # an answer chunk: it carries its mark


async def test_delivering_zero_chunks_sends_the_no_answer_sentence_and_never_records_an_answer(
    live: Live,
) -> None:
    """deliver() refuses to finish an item with nothing to send: the user is told, outcome "refused"."""
    msg = await live.say("hello", mention=False)  # not for the bot: only a message to reply to
    inbound = Inbound(int(msg["id"]), live.general, live.discord.guild_id, int(msg["author"]["id"]), "hi")
    item = await live.app.storage.accept(
        inbound.message_id, ItemKind.INBOUND, inbound.key, inbound.payload(), now=live.app.clock.time(),
        lease_seconds=60, claim=True,
    )
    assert item is not None
    channel = await live.app.channel(live.general)
    turns = [("user", "hi", inbound.message_id), ("model", "", None)]
    outcome = await live.bot.answerer.deliver(
        item, inbound, [], original=inbound.reference(), channel=channel, outcome="answered", turns=turns
    )
    assert outcome == "refused"
    [reply] = await live.wait_replies(msg["id"])
    assert marks.strip(reply.content) == texts.no_answer()  # an answer chunk: it carries its mark
    assert [i.state for i in await live.app.storage.list()] == [ItemState.DONE]
    assert await live.app.storage.history(inbound.key) == []


async def test_oversize_input_is_refused_with_the_limit_and_reaches_no_model(live: Live) -> None:
    before = len(live.gemini.requests)
    msg = await live.say("x " * 3000)
    [reply] = await live.wait_replies(msg["id"])
    assert "4,000" in reply.content
    assert len(live.gemini.requests) == before


# -- outages and the queue ------------------------------------------------------------------


async def test_gemini_503_storm_queues_with_fast_acks_then_answers_each_once_in_order(live: Live) -> None:
    live.gemini.faults.add("503")
    live.app.gemini_retry.max_attempts = 1  # the storm, not the retry policy, is under test here
    # A conversation with a queued message queues later ones behind it without calling Gemini,
    # so it takes fail_max conversations to open the breaker.
    channels = [live.general, live.discord.channels["random"], live.discord.thread_id]
    channels += [live.discord.world.add_text_channel(f"storm-{i}") for i in range(3)]
    sent: list[tuple[int, dict, float]] = []
    for round_ in range(3):
        for channel in channels:
            started = time.perf_counter()
            msg = await live.say(f"question {round_}", channel=channel)
            sent.append((channel, msg, started))
            await live.wait_replies(msg["id"], channel=channel)
    assert live.app.board["gemini"].state is BreakerState.OPEN
    # Once the breaker is open, acknowledgements do not wait for Gemini at all.
    for channel, msg, _ in sent:
        [ack] = live.replies_to(msg["id"], channel)
        assert ack.content.startswith(ACK_MARK), ack.content
        assert "position" in ack.content

    live.gemini.faults.clear()
    for channel, msg, _ in sent:
        await live.wait_replies(msg["id"], 2, channel=channel, timeout=15)
    await asyncio.sleep(0.3)
    for channel in channels:
        answers = [m for m in live.sent(channel) if not m.content.startswith(ACK_MARK)]
        order = [m.content for m in answers]
        assert [bool(re.search(f"question {i}", text)) for i, text in enumerate(order)] == [True] * 3, order
        assert all(text.startswith("You asked earlier") for text in order)
    stats = await live.app.storage.stats(now=live.app.clock.time())
    assert stats.pending() == 0


async def test_acknowledgements_arrive_within_100_ms_while_the_breaker_is_open(live: Live) -> None:
    live.app.board["gemini"].force_open(60, reason="test outage")
    latencies = []
    for i in range(20):
        started = time.perf_counter()
        msg = await live.say(f"q{i}", channel=live.discord.channels["random"] if i % 2 else live.general)
        await live.wait_replies(msg["id"], channel=live.discord.channels["random"] if i % 2 else live.general)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert p99 < 0.1, latencies


async def test_a_short_429_is_retried_transparently_and_a_long_one_queues(live: Live) -> None:
    live.gemini.faults.add("429", count=1, retry_delay="0.2s")
    msg = await live.say("hello")
    [reply] = await live.wait_replies(msg["id"])
    assert not reply.content.startswith(ACK_MARK)

    live.gemini.faults.add("429", count=1, retry_delay="30s")
    msg = await live.say("hello again")
    [ack] = await live.wait_replies(msg["id"])
    assert ack.content.startswith(ACK_MARK)


async def test_a_daily_quota_opens_the_breaker_and_the_reply_says_when(live: Live) -> None:
    live.gemini.faults.add("quota_daily")
    msg = await live.say("hello")
    [ack] = await live.wait_replies(msg["id"])
    assert ack.content.startswith(ACK_MARK)
    assert re.search(r"about \d", ack.content), ack.content
    assert live.app.board["gemini"].state is BreakerState.OPEN
    assert live.app.board["gemini"].remaining_open() > 60


async def test_a_discord_send_outage_moves_the_answer_to_the_outbound_queue_until_discord_heals(
    live: Live,
) -> None:
    live.discord.faults.add("503", "send", count=2)
    msg = await live.say("hello")
    [reply] = await live.wait_replies(msg["id"], timeout=15)
    assert "sandbox Gemini" in reply.content

    async def states() -> list[ItemState]:
        return [i.state for i in await live.app.storage.list()]

    async with asyncio.timeout(5):
        while await states() != [ItemState.DONE]:
            await asyncio.sleep(0.02)
    statuses = [r.status for r in live.discord.requests_for("send")]
    assert statuses.count(503) == 2 and len(live.replies_to(msg["id"])) == 1


# -- concurrency -----------------------------------------------------------------------------


async def test_ten_messages_in_one_conversation_are_answered_in_order(live: Live) -> None:
    messages = [await live.say(f"number {i}") for i in range(10)]
    for m in messages:
        await live.wait_replies(m["id"], answers_only=True, timeout=15)
    answers = [m for m in live.sent() if not m.content.startswith(ACK_MARK)]
    numbers = [int(re.search(r"number (\d)", m.content).group(1)) for m in answers]  # type: ignore[union-attr]
    assert numbers == list(range(10))


async def test_a_message_accepted_while_its_conversation_is_held_is_answered_with_the_history_after_it(
    live: Live,
) -> None:
    """The history read at acceptance is not used if someone held the conversation meanwhile: a
    /reset that forgets the history while the message waits for the mutex is honoured."""
    first = await live.say("hello")
    await live.wait_replies(first["id"])
    key = str(live.general)
    async with live.app.mutex.acquire(key, 1.0, holder="test-reset"):
        waiting = await live.say("what did I say")
        async with asyncio.timeout(5):
            while not any(i.dedup_key == f"msg:{waiting['id']}" for i in await live.app.storage.list()):
                await asyncio.sleep(0.01)
        assert await live.app.storage.forget(key) == 2  # what /reset does, under the mutex
    [answer] = await live.wait_replies(waiting["id"])
    assert "saw 0 earlier turns" in answer.content


async def test_a_conversation_stays_in_order_when_an_earlier_message_s_write_is_slow(live: Live) -> None:
    """Another writer holds the database: A's acceptance waits out the storage timeout, then the
    storage breaker opens and B (same conversation) would fail to be saved at once. Both are
    answered live, unsaved, and A first: messages enter a conversation in arrival order."""
    live.app.storage.statement_timeout = 0.5
    writer = sqlite3.connect(live.app.storage.path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        first = await live.say("message A")
        await asyncio.sleep(0.1)  # A is waiting on the lock
        live.app.board["storage"].force_open(30, reason="test")
        second = await live.say("message B")
        await live.wait_replies(first["id"], timeout=5)
        await live.wait_replies(second["id"], timeout=5)
    finally:
        writer.rollback()
        writer.close()
        live.app.board["storage"].reset()
    answers = [m.content for m in live.sent() if not m.content.startswith(ACK_MARK)]
    assert len(answers) == 2 and "message A" in answers[0] and "message B" in answers[1], answers


async def test_a_reason_why_not_is_not_held_behind_an_earlier_message_s_slow_write(live: Live) -> None:
    """Same slow write for A, but Gemini is down too: B's "can't answer, can't save" comes at once,
    not after A's write gives up (only answers wait for their turn; a reason needs none)."""
    live.app.storage.statement_timeout = 1.0
    writer = sqlite3.connect(live.app.storage.path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        first = await live.say("message A")
        await asyncio.sleep(0.05)  # A is waiting on the lock
        live.app.board["storage"].force_open(30, reason="test")
        live.app.board["gemini"].force_open(30, reason="test")
        started = time.perf_counter()
        second = await live.say("message B")
        [refusal] = await live.wait_replies(second["id"], timeout=5)
        waited = time.perf_counter() - started
        assert not live.replies_to(first["id"]), "A's write should still be waiting"
        await live.wait_replies(first["id"], timeout=5)
    finally:
        writer.rollback()
        writer.close()
        live.app.board["storage"].reset()
        live.app.board["gemini"].reset()
    assert "can't save messages right now" in refusal.content, refusal.content
    assert waited < 0.5, waited
