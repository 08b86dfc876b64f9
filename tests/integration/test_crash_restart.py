"""``kill -9`` of the real bot (``python -m bot run`` child processes), then a restart: every
accepted message is answered exactly once.

Users talk in several conversations (two channels, a thread, a DM). The child is SIGKILLed at
four instants: after it acknowledged ("queued") every message during a Gemini outage; while
Gemini is working on every answer; after Discord has posted the answers but before the bot
heard back (so it never recorded them); and between the chunks of a long answer. A new child
on the same data directory must then answer what is owed, once, and nothing twice, even when
watched a while longer.

Two in-process tests cover the other end of a process's life: a stop that lands while the
services start, or during discord.py's guild-ready wait, must leave nothing running or failing.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

from bot.app import build_application
from bot.client import GeminiBot
from bot.texts import ACK_MARK
from resilience.registry import ServiceState
from sandbox.discord_emu import DiscordEmulator, SentMessage
from sandbox.responder import prose_and_code
from services.config import load_config
from tests.integration.conftest import SpawnBot
from tests.integration.harness import TEST_SETTINGS, BotProcess, Emulators
from tests.integration.test_pipeline import pointed_at

SETTLE = 1.1  # seconds watched after the last answer: more than one drain interval (1 s)
ANSWER_TIMEOUT = 10.0

# Log records excused from assert_clean_logs: none. A Gemini outage is an expected condition and
# the bot logs it below error level; a SIGKILLed child writes nothing at all as it dies; and a
# dead letter or a pipeline bug here would be a real failure.
ALLOWED: tuple[str, ...] = ()


def conversations(discord: DiscordEmulator) -> list[int]:
    """#general, #random, the thread and a DM: four conversations, each with its own lock and queue order."""
    channels = discord.channels
    return [channels["general"], channels["random"], discord.thread_id, discord.dm_channel("normal")]


async def ask_everywhere(discord: DiscordEmulator, per_channel: int = 2) -> list[tuple[int, int, str]]:
    """Each conversation gets ``per_channel`` questions, interleaved; returns (channel, message id, text)."""
    asked = []
    for n in range(per_channel):
        for channel in conversations(discord):
            text = f"question {n} in {channel}"
            data = await discord.send_user_message(channel, "normal", text, mentions_bot=True)
            asked.append((channel, int(data["id"]), text))
    return asked


def replies(discord: DiscordEmulator, channel: int, message_id: int) -> list[SentMessage]:
    return [
        m for m in discord.sent_messages(channel)
        if str((m.message_reference or {}).get("message_id")) == str(message_id)
    ]


def answers(discord: DiscordEmulator, channel: int, message_id: int) -> list[SentMessage]:
    """Replies that answer (not the "queued" acknowledgements)."""
    return [m for m in replies(discord, channel, message_id) if not m.content.startswith(ACK_MARK)]


def answer_counts(discord: DiscordEmulator, asked: list[tuple[int, int, str]]) -> dict[int, int]:
    return {mid: len(answers(discord, channel, mid)) for channel, mid, _ in asked}


async def start_bot(spawn_bot: SpawnBot, emulators: Emulators, env: dict[str, str]) -> BotProcess:
    bot = spawn_bot(env=env)
    await bot.wait_ready(emulators, timeout=20)
    return bot


async def stop(bot: BotProcess) -> None:
    """SIGTERM once discord.py's ready event has fired; the bot must exit 0.

    Waiting for ``bot.ready`` first keeps these tests off a shutdown race they are not about:
    discord.py's ``close()`` does not cancel its guild-ready wait (2 s after READY), so a stop
    slower than that wait lets the ready event fire on a closed client ("'_MissingSentinel'
    object has no attribute 'create_task'", "coroutine 'Client._run_event' was never awaited").
    """
    await bot.wait_for_log(lambda line: line.get("event") == "bot.ready", timeout=10)
    assert await bot.terminate(timeout=15) == 0


async def kill(bot: BotProcess, discord: DiscordEmulator) -> None:
    assert bot.kill() == -9
    await discord.wait_until(lambda: not discord.connected, timeout=5)


async def assert_each_answered_once(emulators: Emulators, asked: list[tuple[int, int, str]]) -> None:
    """Wait until every message has an answer; watch a while longer; each has exactly one, about it."""
    discord = emulators.discord
    try:
        await discord.wait_until(lambda: all(answer_counts(discord, asked).values()), ANSWER_TIMEOUT)
    except TimeoutError:
        counts = answer_counts(discord, asked)
        raise AssertionError(f"unanswered after {ANSWER_TIMEOUT} s: {counts}") from None
    await asyncio.sleep(SETTLE)
    counts = answer_counts(discord, asked)
    assert set(counts.values()) == {1}, counts
    for channel, mid, text in asked:
        [answer] = answers(discord, channel, mid)
        assert text in answer.content, (text, answer.content)
    # Within a conversation the answers come in the order the questions were asked.
    for channel in conversations(discord):
        order = [m.content for m in discord.sent_messages(channel) if not m.content.startswith(ACK_MARK)]
        asked_here = [text for c, _, text in asked if c == channel]
        assert [next(t for t in asked_here if t in content) for content in order] == asked_here, order


def child_env(bot_env: dict[str, str], **extra: str) -> dict[str, str]:
    # One Gemini attempt per message: the outage, not the retry policy, is under test.
    return {**bot_env, "RETRY_MAX_ATTEMPTS": "1", **extra}


async def test_kill_9_after_queued_acks_then_restart_answers_every_message_exactly_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Gemini 503s: every message gets its "queued" acknowledgement; SIGKILL; Gemini heals; a new
    process answers each message once ("You asked earlier"), in order per conversation."""
    discord, gemini = emulators.discord, emulators.gemini
    env = child_env(bot_env)
    first = await start_bot(spawn_bot, emulators, env)
    gemini.faults.add("503")
    asked = await ask_everywhere(discord)
    await discord.wait_until(
        lambda: all(
            any(m.content.startswith(ACK_MARK) for m in replies(discord, c, mid)) for c, mid, _ in asked
        ),
        timeout=ANSWER_TIMEOUT,
    )
    await kill(first, discord)
    assert set(answer_counts(discord, asked).values()) == {0}

    gemini.faults.clear()
    second = await start_bot(spawn_bot, emulators, env)
    await assert_each_answered_once(emulators, asked)
    for channel, mid, _ in asked:
        [answer] = answers(discord, channel, mid)
        assert answer.content.startswith("You asked earlier"), answer.content
        assert sum(m.content.startswith(ACK_MARK) for m in replies(discord, channel, mid)) == 1
    await stop(second)
    first.assert_clean_logs(ALLOWED)
    second.assert_clean_logs(ALLOWED)


async def test_kill_9_while_gemini_is_answering_then_restart_answers_every_message_exactly_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Gemini takes 2 s per answer; SIGKILL while every conversation waits on it; the new process
    finds the claims of the dead one, and answers each message once."""
    discord, gemini = emulators.discord, emulators.gemini
    env = child_env(bot_env)
    first = await start_bot(spawn_bot, emulators, env)
    gemini.faults.add("latency", value=2.0)
    asked = await ask_everywhere(discord, per_channel=1)
    # One Gemini request per conversation is in flight (later ones wait behind their conversation).
    # (Counting generateContent only: the start-up model check's GET is no answer in flight.)
    await discord.wait_until(
        lambda: sum(r.action == "generateContent" for r in gemini.requests) >= len(asked), timeout=5
    )
    await kill(first, discord)
    assert set(answer_counts(discord, asked).values()) == {0}

    gemini.faults.clear()
    second = await start_bot(spawn_bot, emulators, env)
    await assert_each_answered_once(emulators, asked)
    await stop(second)
    first.assert_clean_logs(ALLOWED)
    second.assert_clean_logs(ALLOWED)


async def test_kill_9_after_discord_posted_the_answers_but_before_the_bot_heard_back_sends_none_twice(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Discord posts each answer but holds its response; SIGKILL then. The dead process never
    recorded the answers, so they are still queued: the new one must see them in the channel
    history and not answer again."""
    discord = emulators.discord
    env = child_env(bot_env)
    first = await start_bot(spawn_bot, emulators, env)
    # Held 3 s: far longer than the kill takes, and over before the test ends.
    discord.faults.add("latency", "send", seconds=3.0, after=True)
    asked = await ask_everywhere(discord, per_channel=1)
    await discord.wait_until(lambda: all(answer_counts(discord, asked).values()), timeout=ANSWER_TIMEOUT)
    await kill(first, discord)
    discord.faults.clear()
    started = time.monotonic()

    second = await start_bot(spawn_bot, emulators, env)
    history_reads = _history_reads_after(discord, started)
    await discord.wait_until(lambda: len(history_reads()) >= len(asked), timeout=ANSWER_TIMEOUT)
    await asyncio.sleep(SETTLE)
    assert set(answer_counts(discord, asked).values()) == {1}, answer_counts(discord, asked)
    await stop(second)
    first.assert_clean_logs(ALLOWED)
    second.assert_clean_logs(ALLOWED)


def _history_reads_after(discord: DiscordEmulator, started: float) -> Any:
    """The channel-history reads (the drain's "was it answered already?") since ``started``."""
    return lambda: [r for r in discord.requests_for("history") if r.time >= started and r.status == 200]



READY_RACE = (
    "bot/client.py GeminiBot.close() does not cancel discord.py's guild-ready task "
    "(ConnectionState._ready_task): when close() finishes within guild_ready_timeout of READY and the "
    "loop runs on past it, the task dispatches on_ready on a closed client: 'Task exception was never "
    "retrieved ... _MissingSentinel object has no attribute create_task' and 'coroutine "
    "Client._run_event was never awaited' (seen once in 5 loaded runs of the crash tests on SIGTERM)"
)


async def test_a_stop_during_discord_pys_guild_ready_wait_leaves_no_task_error(
    emulators: Emulators, tmp_path: Path
) -> None:
    """In-process: close the bot after READY but before its ready event (0.3 s wait), keep the loop
    running past the wait, and nothing is reported to the loop's exception handler."""
    environ = {**emulators.settings(), **TEST_SETTINGS, "DATA_DIR": str(tmp_path / "data")}
    app = build_application(load_config(environ=environ, env_file=None))
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("exception"))))
    try:
        with pointed_at(emulators.discord):
            bot = GeminiBot(app, guild_ready_timeout=0.3)
            connected = asyncio.Event()

            async def on_connect() -> None:  # dispatched on READY, before the guild-ready wait
                connected.set()

            bot.add_listener(on_connect)
            task = asyncio.create_task(bot.start(emulators.settings()["DISCORD_TOKEN"]))
            await asyncio.wait_for(connected.wait(), 10)
            assert not bot.is_ready()
            await bot.close()
            await asyncio.wait_for(task, 10)
            await asyncio.sleep(0.5)
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


STARTUP_STOP_RACE = (
    "bot/client.py: close() during setup_hook (a SIGTERM/Ctrl-C while services start) stops only the "
    "services already running, logs bot.stopped, and setup_hook then starts the rest (storage, gemini, "
    "discord_io), which nothing ever stops"
)


async def test_a_stop_while_services_are_starting_leaves_no_service_running(
    emulators: Emulators, tmp_path: Path
) -> None:
    """In-process: close the bot as soon as its first service runs (setup_hook still starting the
    others); once ``start()`` has returned, no service is left running."""
    environ = {**emulators.settings(), **TEST_SETTINGS, "DATA_DIR": str(tmp_path / "data")}
    app = build_application(load_config(environ=environ, env_file=None))
    first = app.registry.order[0]
    with pointed_at(emulators.discord):
        bot = GeminiBot(app, guild_ready_timeout=0.05)
        task = asyncio.create_task(bot.start(emulators.settings()["DISCORD_TOKEN"]))
        async with asyncio.timeout(10):
            while app.registry.states()[first] is not ServiceState.RUNNING:
                await asyncio.sleep(0)
        await bot.close()
        await asyncio.wait_for(task, 10)
        await asyncio.sleep(0.2)
        running = [name for name, state in app.registry.states().items() if state is ServiceState.RUNNING]
        await app.registry.stop_all()  # the test cleans up what the bot left
    assert running == []


PARTIAL_ANSWER_LOST = (
    "Drain._already_answered takes any non-acknowledgement reply as a complete answer, so after a "
    "kill between the chunks of a long answer the restarted bot completes the item and the rest "
    "of the answer is never sent. Fix: record delivery progress (e.g. chunks sent) or compare the "
    "replies found with the answer's chunk count / nonces before completing"
)


async def test_kill_9_between_the_chunks_of_a_long_answer_then_restart_delivers_the_rest(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """A 6000-character answer goes out in several messages; Discord posts the first and the bot is
    killed before it hears back. After the restart the user has the whole answer. (Under
    LONG_ANSWER_CHARS, so it goes as chat messages, not as a file.)"""
    discord = emulators.discord
    env = {**child_env(bot_env), "LONG_ANSWER_CHARS": "100000"}
    first = await start_bot(spawn_bot, emulators, env)
    discord.faults.add("latency", "send", count=1, seconds=3.0, after=True)
    general = discord.channels["general"]
    question = "reply with 6000 characters of code"
    data = await discord.send_user_message(general, "normal", question, mentions_bot=True)
    mid = int(data["id"])
    await discord.wait_until(lambda: len(answers(discord, general, mid)) == 1, timeout=ANSWER_TIMEOUT)
    await kill(first, discord)

    second = await start_bot(spawn_bot, emulators, env)
    expected = len(prose_and_code(6000)) - 50

    def delivered() -> int:
        return sum(len(m.content) for m in discord.sent_messages(general))

    await discord.wait_until(lambda: delivered() >= expected, timeout=ANSWER_TIMEOUT)
    await asyncio.sleep(SETTLE)
    await stop(second)
    contents = [m.content for m in discord.sent_messages(general)]
    assert delivered() >= expected, f"{delivered()} characters of the answer reached the user"
    assert len(contents) == len(set(contents)), "a chunk of the answer was posted twice"
    first.assert_clean_logs(ALLOWED)
    second.assert_clean_logs(ALLOWED)
