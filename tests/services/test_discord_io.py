"""DiscordIO against a real, unpatched discord.py bot logged in to the loopback Discord emulator.

Each test starts an emulator, points ``Route.BASE`` / ``DEFAULT_GATEWAY`` at it (restored
afterwards), logs a ``commands.Bot`` in, and drives ``DiscordIO`` with a breaker board on a
``FakeClock``; assertions read what the emulator recorded (requests, allowed_mentions, pings).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import pytest
from discord.ext import commands

from resilience.breakers import BreakerBoard, BreakerState
from resilience.clock import FakeClock
from resilience.errors import CallTimeoutError, CircuitOpenError
from sandbox.discord_emu import DiscordEmulator
from services.discord_io import (
    MAX_RATELIMIT_WAIT,
    TYPING_DELAY,
    DiscordIO,
    EmptyMessageError,
    PartialDeliveryError,
    RateLimitWaitError,
    allowed_mentions_for,
    is_permanent,
    not_discords_fault,
)
from services.metrics import Metrics
from tests.integration.harness import pointed_at

FAIL_MAX = 3
BREAKERS = ("discord.send", "discord.edit", "discord.react", "discord.typing", "discord.read")


@dataclass
class Env:
    """A logged-in bot, its emulator, a DiscordIO on a FakeClock board, and the metrics it feeds."""

    emu: DiscordEmulator
    bot: commands.Bot
    board: BreakerBoard
    io: DiscordIO
    metrics: Metrics

    def channel(self, name: str = "general") -> discord.TextChannel:
        channel = self.bot.get_channel(self.emu.channels[name])
        assert isinstance(channel, discord.TextChannel)
        return channel

    async def user_message(self, content: str = "question", user: str = "normal") -> discord.Message:
        """A message from a member in #general, as discord.py sees it."""
        data = await self.emu.send_user_message(self.emu.channels["general"], user, content)
        return await self.channel().fetch_message(int(data["id"]))

    def send_statuses(self) -> list[int | None]:
        return [r.status for r in self.emu.requests_for("send")]

    def error_count(self, category: str) -> float:
        value = self.metrics.registry.get_sample_value("bot_errors_total", {"category": category})
        return value or 0.0


@contextlib.asynccontextmanager
async def make_env(board: BreakerBoard | None = None, **io_kwargs: Any) -> AsyncIterator[Env]:
    """Emulator + DiscordIO (fail_max 3) + a bot logged in with its ``client_options()`` (the
    client default pings nobody)."""
    # A long heartbeat: with a short one, discord.py's keep-alive thread can wake after the test's
    # loop has closed and warn; these tests do not exercise gateway liveness.
    async with DiscordEmulator(heartbeat_interval=30.0) as emu:
        with pointed_at(emu):
            board = board or BreakerBoard(FakeClock(), fail_max=FAIL_MAX, reset_timeout=30.0)
            metrics = Metrics(process_metrics=False)
            io = DiscordIO(board, metrics=metrics, **io_kwargs)
            intents = discord.Intents.default()
            intents.members = True
            intents.message_content = True
            bot = commands.Bot(
                command_prefix="!", intents=intents, guild_ready_timeout=0.05,
                allowed_mentions=allowed_mentions_for(None), **io.client_options(),
            )
            await bot.login(emu.token)
            task = asyncio.create_task(bot.connect())
            try:
                async with asyncio.timeout(5):
                    await bot.wait_until_ready()
                yield Env(emu, bot, board, io, metrics)
            finally:
                await bot.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """The default environment: FakeClock board, 15 s call timeout, 7 s typing renewals."""
    async with make_env() as environment:
        yield environment


def test_allowed_mentions_for_pings_nobody_or_only_the_given_user() -> None:
    """No everyone/roles ever; users and replied_user only for the given user."""
    assert allowed_mentions_for(None).to_dict() == {"parse": []}
    assert allowed_mentions_for(discord.Object(42)).to_dict() == {
        "parse": [], "users": [42], "replied_user": True
    }


async def test_llm_output_with_mass_mentions_pings_only_the_replied_to_user(env: Env) -> None:
    """@everyone, @here, a role and another user in the text ping nobody; the reply pings its author."""
    emu = env.emu
    admin, normal = emu.users["admin"], emu.users["normal"]
    question = await env.user_message()
    text = f"@everyone @here <@&{emu.guild_id}> <@{admin}> and <@{normal}>, here is the answer"
    await env.io.send(env.channel(), text, reply_to=question, mention_user=question.author)
    await env.io.send(env.channel(), text)  # no reply, nobody to ping
    replied, plain = emu.sent_messages(emu.channels["general"])
    assert replied.allowed_mentions == {"parse": [], "users": [normal], "replied_user": True}
    assert replied.pings == {f"user:{normal}"}
    assert replied.payload["mention_everyone"] is False and replied.payload["mention_roles"] == []
    assert plain.allowed_mentions == {"parse": []}
    assert plain.pings == set()


async def test_send_chunks_replies_with_the_first_and_sends_the_rest_in_order(env: Env) -> None:
    """Three chunks: the first carries the message_reference, the others none, all in order."""
    question = await env.user_message()
    messages = await env.io.send_chunks(env.channel(), ["one", "two", "three"], reply_to=question,
                                        mention_user=question.author)
    sent = env.emu.sent_messages(env.emu.channels["general"])
    assert [m.content for m in sent] == ["one", "two", "three"]
    assert [m.id for m in messages] == [m.id for m in sent]
    assert sent[0].message_reference is not None
    assert int(sent[0].message_reference["message_id"]) == question.id
    assert sent[0].message_reference["fail_if_not_exists"] is False
    assert [m.message_reference for m in sent[1:]] == [None, None]
    # only the first chunk may ping the asker
    assert [m.pings for m in sent] == [{f"user:{env.emu.users['normal']}"}, set(), set()]
    assert env.io.errors == {}


async def test_a_blank_chunk_is_skipped_and_the_rest_of_the_answer_delivered(env: Env) -> None:
    """An answer an older splitter cut into [text, only newlines, text] (still in the outbound
    queue after an upgrade): Discord refuses the blank chunk (50006), which used to stop the
    delivery and lose the rest. The blank chunk is skipped; both chunks with text arrive, each
    with its own index's nonce, and no request with blank content reaches Discord."""
    question = await env.user_message()
    # a blank chunk, and one that also ends with invisible zero-width characters (Discord would post
    # that one, as a message showing nothing)
    chunks = ["first part", "\n" * 1500 + "  ", "\n \u200b\u200d\u2063", "last part"]
    messages = await env.io.send_chunks(env.channel(), chunks, reply_to=question, nonce="q1")
    sent = env.emu.sent_messages(env.emu.channels["general"])
    assert [m.content for m in sent] == ["first part", "last part"]
    assert [m.id for m in messages] == [m.id for m in sent]
    assert [r.json["nonce"] for r in env.emu.requests_for("send")] == ["q1.0", "q1.3"]
    assert env.send_statuses() == [200, 200]


async def test_a_blank_first_chunk_leaves_the_reply_to_the_first_chunk_with_text(env: Env) -> None:
    question = await env.user_message()
    await env.io.send_chunks(env.channel(), [" ", "answer"], reply_to=question, mention_user=question.author)
    [sent] = env.emu.sent_messages(env.emu.channels["general"])
    assert sent.content == "answer" and sent.message_reference is not None
    assert sent.pings == {f"user:{env.emu.users['normal']}"}


async def test_blank_content_is_refused_before_it_reaches_discord(env: Env) -> None:
    """send() with only whitespace (and no embed) raises EmptyMessageError without a request, and
    without counting against the breaker; an answer whose every chunk is blank likewise. A resumed
    delivery whose remaining chunks are blank has nothing left to send: it is done."""
    with pytest.raises(EmptyMessageError):
        await env.io.send(env.channel(), " \n\t ")
    with pytest.raises(EmptyMessageError):
        await env.io.send_chunks(env.channel(), ["\n\n", "   "])
    assert await env.io.send_chunks(env.channel(), ["\n"], first_index=2) == []
    assert env.emu.requests_for("send") == []
    assert env.board["discord.send"].failures == 0
    embedded = await env.io.send(env.channel(), " ", embed=discord.Embed(description="an embed"))
    assert embedded.embeds[0].description == "an embed"


async def test_a_resent_chunk_whose_first_copy_was_deleted_counts_as_delivered(env: Env) -> None:
    """Chunk 0 was posted (its response lost, say) and then deleted by a moderator: the resend with
    the same nonce gets 10008 from Discord, nothing is posted again, and the other chunks go out."""
    general = env.emu.channels["general"]
    question = await env.user_message()
    [first] = await env.io.send_chunks(env.channel(), ["one"], reply_to=question, nonce="q2")
    await env.emu.delete_message(general, first.id)
    messages = await env.io.send_chunks(env.channel(), ["one", "two", "three"], reply_to=question, nonce="q2")
    assert [m.content for m in messages] == ["two", "three"]
    assert [(m.content, m.deleted) for m in env.emu.sent_messages(general)] == [
        ("one", True), ("two", False), ("three", False)
    ]
    assert env.send_statuses() == [200, 404, 200, 200]
    assert env.board["discord.send"].failures == 0


async def test_unknown_message_on_a_send_without_a_nonce_is_an_error(env: Env) -> None:
    """Only an enforced nonce makes a 10008 mean "your earlier copy was deleted"."""
    env.emu.faults.add("error", "send", count=1, status=404, code=10008, message="Unknown Message")
    with pytest.raises(discord.NotFound):
        await env.io.send_chunks(env.channel(), ["one", "two"])
    assert env.emu.sent_messages(env.emu.channels["general"]) == []


async def test_a_reply_to_a_deleted_message_is_still_delivered(env: Env) -> None:
    """The user deleted the question while we generated: the answer goes out without failing."""
    question = await env.user_message()
    await question.delete()
    reference = discord.MessageReference(message_id=question.id, channel_id=question.channel.id)
    assert reference.fail_if_not_exists  # discord.py's default would make Discord refuse the send
    partial = env.channel().get_partial_message(question.id)  # what a queue drain rebuilds from an id
    for reply_to in (question, reference, partial):
        message = await env.io.send(env.channel(), "late answer", reply_to=reply_to)
        assert message.content == "late answer"
    assert env.send_statuses() == [200, 200, 200]


async def test_503_raises_discord_server_error_and_is_counted(env: Env) -> None:
    """A 503 reaches the caller as DiscordServerError (no retry here); breaker, errors, metrics count it."""
    env.emu.faults.add("503", "send", count=1)
    with pytest.raises(discord.DiscordServerError):
        await env.io.send(env.channel(), "hello")
    breaker = env.board["discord.send"]
    assert breaker.failures == 1 and breaker.state is BreakerState.CLOSED
    assert env.io.errors == {("send", "unavailable"): 1}
    assert env.error_count("unavailable") == 1
    assert env.send_statuses() == [503]
    await env.io.send(env.channel(), "hello")  # a success resets the consecutive count
    assert breaker.failures == 0


async def test_fail_max_503s_open_the_send_breaker_and_later_sends_fail_fast(env: Env) -> None:
    """Three 503s open discord.send: the next send raises CircuitOpenError without reaching Discord,
    while reactions (their own breaker) still work; health reports not ok."""
    env.emu.faults.add("503", "send", count=FAIL_MAX)
    for _ in range(FAIL_MAX):
        with pytest.raises(discord.DiscordServerError):
            await env.io.send(env.channel(), "hello")
    assert env.board["discord.send"].state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        await env.io.send(env.channel(), "hello")
    assert info.value.name == "discord.send" and info.value.remaining == pytest.approx(30.0)
    assert env.send_statuses() == [503] * FAIL_MAX  # the rejected send never reached the emulator
    assert env.io.errors[("send", "circuit_open")] == 1
    question = await env.user_message()
    assert await env.io.react(question, "👀") is True
    health = env.io.health()
    assert health["ok"] is False
    assert health["breakers"] == {n: "open" if n == "discord.send" else "closed" for n in BREAKERS}


async def test_permission_errors_do_not_count_towards_opening_the_breaker(env: Env) -> None:
    """403s (a channel we may not write in) count neither way: after 2 503s and five 403s, one more
    503 is what opens the breaker; a 403 on edit (50005) leaves discord.edit untouched."""
    breaker = env.board["discord.send"]
    env.emu.faults.add("503", "send", count=2)
    for _ in range(2):
        with pytest.raises(discord.DiscordServerError):
            await env.io.send(env.channel(), "hello")
    env.emu.faults.add("error", "send", count=5, status=403)
    for _ in range(5):
        with pytest.raises(discord.Forbidden):
            await env.io.send(env.channel(), "hello")
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 2
    assert env.io.errors[("send", "permission")] == 5
    env.emu.faults.add("503", "send", count=1)
    with pytest.raises(discord.DiscordServerError):
        await env.io.send(env.channel(), "hello")
    assert breaker.state is BreakerState.OPEN

    someone_elses = await env.user_message()
    for _ in range(FAIL_MAX + 1):
        with pytest.raises(discord.Forbidden) as info:
            await env.io.edit(someone_elses, "mine now")
    assert info.value.code == 50005
    assert env.board["discord.edit"].failures == 0
    assert env.board["discord.edit"].state is BreakerState.CLOSED


def test_rate_limits_and_permanent_failures_are_no_fault_of_discord() -> None:
    """The breakers' exclusion: rate limits and permanent failures; 5xx-type failures count."""
    assert not_discords_fault(discord.RateLimited(45.0))
    assert not_discords_fault(RateLimitWaitError(3.0))
    assert not_discords_fault(ValueError("bug"))
    assert not not_discords_fault(CallTimeoutError("discord.send", 1.0))
    assert not not_discords_fault(ConnectionResetError())


def test_is_permanent_follows_classify() -> None:
    """Breaker exclusion: 4xx-type failures are permanent, 5xx, timeouts and open circuits are not."""
    assert not is_permanent(CircuitOpenError("discord.send", 1.0))
    assert not is_permanent(CallTimeoutError("discord.send", 1.0))
    assert not is_permanent(ConnectionResetError())
    assert is_permanent(ValueError("bug"))


async def test_partial_delivery_reports_what_was_sent_and_what_remains(env: Env) -> None:
    """The second of three chunks hits a 503: PartialDeliveryError holds the first message and the
    two remaining chunks, chained to the cause; sending the remainder completes the answer once."""
    question = await env.user_message()
    env.emu.faults.add("latency", "send", count=1, seconds=0.0)  # the first send passes untouched
    env.emu.faults.add("503", "send", count=1)  # the second fails
    with pytest.raises(PartialDeliveryError) as info:
        await env.io.send_chunks(env.channel(), ["one", "two", "three"], reply_to=question)
    err = info.value
    assert [m.content for m in err.sent] == ["one"]
    assert err.remaining == ["two", "three"]
    assert isinstance(err.cause, discord.DiscordServerError) and err.__cause__ is err.cause
    await env.io.send_chunks(env.channel(), err.remaining)
    assert [m.content for m in env.emu.sent_messages(env.emu.channels["general"])] == ["one", "two", "three"]


async def test_a_failing_first_chunk_raises_the_original_error(env: Env) -> None:
    """Nothing delivered: the caller gets the discord.py exception itself, not a PartialDeliveryError."""
    env.emu.faults.add("503", "send", count=1)
    with pytest.raises(discord.DiscordServerError):
        await env.io.send_chunks(env.channel(), ["one", "two"])
    assert env.emu.sent_messages(env.emu.channels["general"]) == []


async def test_a_hung_send_times_out_inside_the_breaker() -> None:
    """A send slower than the timeout raises CallTimeoutError and counts as a breaker failure."""
    async with make_env(timeout=0.05) as env:
        env.emu.faults.add("latency", "send", count=1, seconds=0.15)
        with pytest.raises(CallTimeoutError):
            await env.io.send(env.channel(), "slow")
        assert env.board["discord.send"].failures == 1
        assert env.io.errors == {("send", "timeout"): 1}


async def test_edit_goes_through_its_breaker_without_pinging(env: Env) -> None:
    """edit() replaces the content, with allowed_mentions that ping nobody."""
    message = await env.io.send(env.channel(), "draft")
    edited = await env.io.edit(message, "final @everyone")
    assert edited.content == "final @everyone"
    [sent] = env.emu.sent_messages(env.emu.channels["general"])
    [edit] = sent.edits
    assert (edit["content"], edit["allowed_mentions"]) == ("final @everyone", {"parse": []})


async def test_react_adds_the_reaction_and_swallows_failures(env: Env) -> None:
    """react() returns True when added; a 503 or a 403 returns False, counted, never raised.

    (A dropped connection is no test here: aiohttp itself retries an idempotent PUT once.)"""
    question = await env.user_message()
    assert await env.io.react(question, "👀") is True
    assert env.emu.reactions(question.id) == {"👀": {env.emu.bot_user_id}}
    env.emu.faults.add("503", "react", count=1)
    env.emu.faults.add("error", "react", count=1, status=403)
    assert await env.io.react(question, "✅") is False
    assert await env.io.react(question, "✅") is False
    assert env.io.errors == {("react", "unavailable"): 1, ("react", "permission"): 1}
    assert await env.io.react(question, "✅") is True
    assert env.board["discord.send"].failures == 0


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Capture what the event loop would report as unhandled (e.g. 'Task exception was never retrieved')."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
        gc.collect()  # unretrieved task exceptions are reported when the task is collected
    finally:
        loop.set_exception_handler(old)


async def test_a_block_quicker_than_the_typing_delay_sends_no_indicator() -> None:
    """A quick answer (the block ends before typing_delay) costs no typing request, and leaves no task."""
    async with make_env(typing_delay=5.0, typing_interval=0.01) as env:
        for _ in range(3):
            async with env.io.typing(env.channel()):
                await asyncio.sleep(0.01)  # long enough for an immediate request to reach the emulator
        await env.io.send(env.channel(), "answer")  # a later request: the emulator saw everything before it
        assert env.emu.requests_for("typing") == []
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("typing:")] == []


async def test_the_first_indicator_waits_for_the_default_typing_delay() -> None:
    """By default the indicator is sent only after TYPING_DELAY (half a second) of work, then renewed."""
    clock = FakeClock()
    async with make_env(clock=clock) as env:
        async with env.io.typing(env.channel()):
            await env.emu.wait_until(lambda: len(env.emu.typing) >= 1, timeout=2)
        assert TYPING_DELAY == 0.5
        assert clock.sleeps[0] == TYPING_DELAY  # slept the delay before the first request
        assert clock.sleeps[1:2] in ([], [7.0])  # then the renewal interval, if it got that far


async def test_typing_shows_the_indicator_and_renews_it() -> None:
    """With no delay the indicator is sent at once, renewed every typing_interval, stopped with the block."""
    async with make_env(typing_delay=0.0, typing_interval=0.01) as env:
        general = env.emu.channels["general"]
        async with env.io.typing(env.channel()):
            await env.emu.wait_until(lambda: len(env.emu.typing) >= 3, timeout=2)
        count = len(env.emu.typing)
        await asyncio.sleep(0.03)
        assert len(env.emu.typing) == count  # no renewals after the block
        assert set(env.emu.typing) == {general}


async def test_typing_errors_never_fail_the_message() -> None:
    """503s and dropped connections on typing are swallowed and counted; after fail_max only the
    typing breaker opens; nothing is left for the loop to report as an unretrieved exception."""
    async with make_env(typing_delay=0.0, typing_interval=0.01) as env:
        env.emu.faults.add("drop", "typing", count=1)
        env.emu.faults.add("503", "typing")
        with loop_errors() as unhandled:
            async with env.io.typing(env.channel()):
                async with asyncio.timeout(2):
                    while env.io.errors[("typing", "circuit_open")] < 2:  # renewals go on, rejected
                        await asyncio.sleep(0.005)
            result = "answered"
        assert result == "answered" and unhandled == []
        statuses = [r.status for r in env.emu.requests_for("typing")]
        assert statuses == [None] + [503] * (FAIL_MAX - 1)
        assert env.io.errors[("typing", "connection")] == 1
        assert env.io.errors[("typing", "unavailable")] == FAIL_MAX - 1
        assert env.io.errors[("typing", "circuit_open")] >= 1
        assert env.board["discord.send"].state is BreakerState.CLOSED
        await env.io.send(env.channel(), "still answering")


async def test_typing_stops_renewing_after_a_permission_error() -> None:
    """A 403 on typing will not heal while we answer: one request, then no more renewals."""
    async with make_env(typing_delay=0.0, typing_interval=0.01) as env:
        env.emu.faults.add("error", "typing", status=403)
        async with env.io.typing(env.channel()):
            await env.emu.wait_until(lambda: len(env.emu.requests_for("typing")) == 1, timeout=2)
            await asyncio.sleep(0.04)
        assert [r.status for r in env.emu.requests_for("typing")] == [403]
        assert env.io.errors == {("typing", "permission"): 1}


async def test_typing_block_errors_and_cancellation_propagate_and_the_task_ends(env: Env) -> None:
    """An exception or a cancellation inside the block propagates unchanged; no typing task outlives it."""
    before = asyncio.all_tasks()
    with pytest.raises(ValueError, match="boom"):
        async with env.io.typing(env.channel()):
            raise ValueError("boom")

    started = asyncio.Event()

    async def answer() -> None:
        async with env.io.typing(env.channel()):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(answer())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() - before if t.get_name().startswith("typing:")} == set()


async def test_existing_breakers_on_the_board_are_used_as_configured() -> None:
    """A breaker the app created beforehand (fail_max 1) is used, not replaced."""
    board = BreakerBoard(FakeClock(), fail_max=5)
    board.add("discord.send", fail_max=1)
    async with make_env(board=board) as env:
        env.emu.faults.add("503", "send", count=1)
        with pytest.raises(discord.DiscordServerError):
            await env.io.send(env.channel(), "hello")
        assert board["discord.send"].state is BreakerState.OPEN
        assert board.names() == list(BREAKERS)


async def test_service_protocol(env: Env) -> None:
    """Registry service: name, no dependencies, start/stop are no-ops, health is ok when closed."""
    assert (env.io.name, env.io.depends_on) == ("discord_io", ())
    await env.io.start()
    await env.io.stop()
    assert env.io.health() == {
        "ok": True,
        "breakers": dict.fromkeys(BREAKERS, "closed"),
        "errors": {},
    }


async def test_a_dropped_connection_on_send_is_a_transient_failure(env: Env) -> None:
    """A TCP drop surfaces as aiohttp.ClientError and counts towards the breaker."""
    env.emu.faults.add("drop", "send", count=1)
    with pytest.raises(aiohttp.ClientError):
        await env.io.send(env.channel(), "hello")
    assert env.board["discord.send"].failures == 1
    assert env.io.errors == {("send", "connection"): 1}


async def test_reads_go_through_the_read_breaker_under_the_call_timeout() -> None:
    """A fetch of an uncached channel, a DM to open and a look through history that hang at
    Discord each end after the call timeout (0.2 s) as a counted failure of ``discord.read``,
    which then opens (3 failures) and rejects the next read at once; the send breaker is untouched."""
    async with make_env(timeout=0.2) as env:
        question = await env.user_message("was this answered?")
        env.emu.faults.add("latency", "channel", seconds=30)
        env.emu.faults.add("latency", "dm", seconds=30)
        env.emu.faults.add("latency", "history", seconds=30)
        unknown = env.emu.world.snowflake()
        with pytest.raises(CallTimeoutError):
            await env.io.fetch_channel(env.bot, unknown)
        with pytest.raises(CallTimeoutError):
            await env.io.dm_channel(env.bot, env.emu.users["admin"])
        with pytest.raises(CallTimeoutError):
            await env.io.find_message(env.channel(), lambda m: True, after=question, limit=500)
        assert env.board["discord.read"].state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await env.io.find_message(env.channel(), lambda m: True, after=question, limit=500)
        assert env.board["discord.send"].state is BreakerState.CLOSED


async def test_find_message_returns_the_first_match_after_a_message_and_a_cached_channel_needs_no_read(
    env: Env,
) -> None:
    question = await env.user_message("first")
    for text in ("one", "two", "three"):
        await env.io.send(env.channel(), text)
    channel = env.channel()
    found = await env.io.find_message(channel, lambda m: m.content.startswith("t"), after=question, limit=10)
    assert found is not None and found.content == "two"
    assert await env.io.find_message(channel, lambda m: m.content == "x", after=question, limit=10) is None
    before = len(env.emu.requests_for("channel"))
    assert await env.io.fetch_channel(env.bot, env.emu.channels["general"]) is env.channel()
    assert len(env.emu.requests_for("channel")) == before


# -- rate limits ------------------------------------------------------------------------------


async def test_a_channel_throttled_for_40_s_raises_rate_limited_at_once_and_never_opens_the_breaker() -> None:
    """#general may send once per 40 s. Every later send there raises ``discord.RateLimited`` at
    once, with the wait left (Discord's 429 says 40 s, more than discord.py's
    ``max_ratelimit_timeout``), instead of hanging until the call timeout; rate limits count
    neither way, so after many of them ``discord.send`` is still closed and #random's sends go out."""
    async with make_env(timeout=1.0) as env:
        general = env.emu.channels["general"]
        env.emu.rate_limits.set("send", 1, 40.0, channel_id=general)
        await env.io.send(env.channel(), "the one send of the window")
        for _ in range(FAIL_MAX + 2):
            with pytest.raises(discord.RateLimited) as info:
                await env.io.send(env.channel(), "held")
            assert 35.0 < info.value.retry_after <= 40.0
        await env.io.send(env.channel("random"), "another channel")
        breaker = env.board["discord.send"]
        assert breaker.state is BreakerState.CLOSED and breaker.failures == 0
        assert env.send_statuses() == [200] + [429] * (FAIL_MAX + 2) + [200]
        assert env.io.errors == {("send", "rate_limited"): FAIL_MAX + 2}


async def test_a_429_longer_than_discord_py_waits_raises_rate_limited_with_its_retry_after(env: Env) -> None:
    env.emu.faults.add("429", "send", count=FAIL_MAX, retry_after=45.0)
    for _ in range(FAIL_MAX):
        with pytest.raises(discord.RateLimited) as info:
            await env.io.send(env.channel(), "hello")
        assert info.value.retry_after == 45.0
    assert env.board["discord.send"].state is BreakerState.CLOSED
    assert env.board["discord.send"].failures == 0


async def test_a_429_without_via_a_cloudflare_ban_counts_towards_the_breaker(env: Env) -> None:
    """No ``Via``: not Discord's API but Cloudflare refusing the IP, every route, for a while; the
    breaker opens so that the bot stops prolonging the ban."""
    env.emu.faults.add("429", "send", count=FAIL_MAX, retry_after=5.0, via=False)
    for _ in range(FAIL_MAX):
        with pytest.raises(discord.HTTPException) as info:
            await env.io.send(env.channel(), "hello")
        assert info.value.status == 429
    assert env.board["discord.send"].state is BreakerState.OPEN


async def test_a_rate_limit_wait_longer_than_the_call_timeout_is_waited_out_not_timed_out() -> None:
    """A 429 with retry_after 1.2 s and a 0.5 s call timeout: discord.py sleeps the 1.2 s and sends
    again; the timeout bounds Discord's answers, not that wait, so the send succeeds, counted as
    nothing but a success."""
    async with make_env(timeout=0.5) as env:
        env.emu.faults.add("429", "send", count=1, retry_after=1.2)
        message = await env.io.send(env.channel(), "after the wait")
        assert message.content == "after the wait"
        sends = env.emu.requests_for("send")
        assert [r.status for r in sends] == [429, 200]
        assert sends[1].time - sends[0].time >= 1.2 - 0.01
        assert env.io.errors == {}


async def test_the_send_that_uses_up_a_bucket_waits_for_the_window_with_discord_py() -> None:
    """Two sends per 1.2 s and a 0.5 s call timeout: discord.py sleeps out the rest of the window
    after the request that left nothing (before it returns), which is no timeout of Discord's."""
    async with make_env(timeout=0.5) as env:
        env.emu.rate_limits.set("send", 2, 1.2)
        for n in range(3):
            await env.io.send(env.channel(), f"message {n}")
        assert env.send_statuses() == [200, 200, 200]
        assert env.io.errors == {}


async def test_a_call_held_for_rate_limits_past_its_deadline_is_a_rate_limit_not_a_timeout() -> None:
    """A 429 with retry_after 2 s, a 0.5 s timeout and only 0.5 s of rate-limit wait allowed:
    discord.py is still sleeping when the deadline passes, which raises ``RateLimitWaitError``
    (counted neither way, with the wait left); a send that Discord is slow to answer is a
    counted timeout."""
    async with make_env(timeout=0.5, rate_limit_wait=0.5) as env:
        env.emu.faults.add("429", "send", count=1, retry_after=2.0)
        with pytest.raises(RateLimitWaitError) as info:
            await env.io.send(env.channel(), "held")
        assert 0.0 <= info.value.retry_after < 2.0
        assert env.board["discord.send"].failures == 0
        env.emu.faults.add("latency", "send", count=1, seconds=1.5)
        with pytest.raises(CallTimeoutError):
            await env.io.send(env.channel("random"), "slow")
        assert env.board["discord.send"].failures == 1
        assert env.io.errors == {("send", "rate_limited"): 1, ("send", "timeout"): 1}


def test_the_client_options_wait_out_at_most_max_ratelimit_wait_and_trace_requests() -> None:
    options = DiscordIO(BreakerBoard(FakeClock())).client_options()
    assert options["max_ratelimit_timeout"] == MAX_RATELIMIT_WAIT == 30.0
    assert isinstance(options["http_trace"], aiohttp.TraceConfig)
