"""Two shard processes on one PostgreSQL database act as one bot.

Two real ``GeminiBot`` applications (in one test process, each with its own store, pool, session,
data directory and breakers) run as shards 0 and 1 of 2 (``SHARD_COUNT=2``, ``SHARD_IDS=0`` and
``1``: discord.py's AutoShardedBot) against the emulated Discord, which routes a guild's events to
shard ``(guild_id >> 22) % 2`` and DMs to shard 0. Each receives only its shards' messages, every
message is answered exactly once, and each heartbeat row names its shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import discord

from bot.app import Application, build_application
from bot.client import GeminiBot, ShardedGeminiBot, make_bot
from sandbox.discord_emu import shard_of
from services.config import load_config
from tests.integration.harness import TEST_SETTINGS, Emulators, pointed_at, running_emulators
from tests.integration.test_scale_out import answers
from tests.pg import PostgresServer

SHARDS = 2
PER_CHANNEL = 6


@dataclass
class Shard:
    app: Application
    bot: GeminiBot
    received: list[int | None] = field(default_factory=list)  # guild ids (None: a DM) of users' messages


@contextlib.asynccontextmanager
async def shard_process(
    emus: Emulators, data_dir: Path, database_url: str, shard: int
) -> AsyncIterator[Shard]:
    environ = {
        **emus.settings(), **TEST_SETTINGS, "DATA_DIR": str(data_dir), "LOG_FORMAT": "console",
        "DATABASE_URL": database_url, "DATABASE_POOL_SIZE": "4",
        "SHARD_COUNT": str(SHARDS), "SHARD_IDS": str(shard),
    }
    config = load_config(environ=environ, env_file=None)
    app = build_application(config)
    bot = make_bot(app, guild_ready_timeout=0.05, drain_interval=0.05, check_models=False)
    assert isinstance(bot, ShardedGeminiBot)
    process = Shard(app, bot)

    async def record(message: discord.Message) -> None:
        if not message.author.bot:
            process.received.append(message.guild.id if message.guild is not None else None)

    bot.add_listener(record, "on_message")
    task = asyncio.create_task(bot.start(config.discord_token or ""))
    try:
        async with asyncio.timeout(15):
            while not bot.is_ready():
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield process
    finally:
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def test_each_shard_receives_its_guilds_and_every_message_is_answered_once(
    pg_url: str, pg_server: PostgresServer, tmp_path: Path
) -> None:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        emu = emus.discord
        # Two more guilds, one per shard, each with a channel; the first guild is on one of them too.
        channels = [emu.channels["general"]]
        for shard in range(SHARDS):
            gid = emu.world.add_guild(f"shard-{shard}", shard=(shard, SHARDS))
            channels.append(emu.world.add_text_channel("chat", guild_id=gid))
        dm = emu.dm_channel("normal")
        with pointed_at(emu):
            async with (
                shard_process(emus, tmp_path / "a", pg_url, 0) as a,
                shard_process(emus, tmp_path / "b", pg_url, 1) as b,
            ):
                assert emu.shard_sessions == {0: 1, 1: 1}
                assert a.app.discord_shards() == {"count": 2, "ids": [0], "open": [0]}
                assert a.app.discord_connected() and b.app.discord_connected()
                sent: list[tuple[int, str]] = []
                for n in range(PER_CHANNEL):
                    for channel in [*channels, dm]:
                        message = await emu.send_user_message(
                            channel, author="normal", content=f"hello {n}", mentions_bot=channel != dm
                        )
                        sent.append((channel, str(message["id"])))
                await emu.wait_until(lambda: all(answers(emus, c, i) for c, i in sent), 20)
                # Every item finished (none left to answer a second time), then count the answers.
                await emu.wait_until(
                    lambda: pg_server.fetch(pg_url, "SELECT COUNT(*) FROM queue WHERE state IN "
                                                    "('pending', 'claimed')") == [(0,)], 10
                )
                assert [len(answers(emus, c, i)) for c, i in sent] == [1] * len(sent)
                assert pg_server.fetch(pg_url, "SELECT COUNT(*) FROM processed") == [(len(sent),)]

                guild_of = {c: emu.world.channel_guild(c) for c in channels}
                for process, shard in ((a, 0), (b, 1)):
                    expected = [
                        guild_of.get(c) for c, _ in sent
                        if (c == dm and shard == 0) or (c != dm and shard_of(guild_of[c], SHARDS) == shard)
                    ]
                    assert process.received == expected, f"shard {shard}"
                assert a.received.count(None) == PER_CHANNEL and None not in b.received

                for process in (a, b):
                    await process.bot._beat()
                rows = await a.bot.operations.processes(by="test")
                assert sorted(r["state"]["shards"]["ids"] for r in rows) == [[0], [1]]


async def test_a_shard_process_started_after_its_shard_had_no_session_reads_back_what_was_said(
    pg_url: str, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Shard 1's process stops; users keep writing in its guild (no process receives that: Discord
    delivers a shard's events to its session only); the next process of shard 1 reads those
    messages back and answers each once, in order, before the live ones: in a channel it had
    answered in (from the database) and in one where nobody had spoken before (from the guild's
    channels whose last message is newer than the previous holder's last heartbeat)."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        emu = emus.discord
        gid = emu.world.add_guild("shard-1", shard=(1, SHARDS))
        channel = emu.world.add_text_channel("chat", guild_id=gid)
        quiet = emu.world.add_text_channel("quiet", guild_id=gid)
        say = emu.send_user_message
        with pointed_at(emu):
            async with shard_process(emus, tmp_path / "a", pg_url, 0):
                async with shard_process(emus, tmp_path / "b", pg_url, 1):
                    first = await say(channel, author="normal", content="before", mentions_bot=True)
                    await emu.wait_until(lambda: bool(answers(emus, channel, str(first["id"]))), 10)
                await emu.wait_until(lambda: 1 not in emu.shard_sessions, 5)
                missed = [await say(channel, author="normal", content=f"missed {n}", mentions_bot=True)
                          for n in range(4)]
                new = await say(quiet, author="normal", content="first words here", mentions_bot=True)
                async with shard_process(emus, tmp_path / "b", pg_url, 1):
                    live = await say(channel, author="normal", content="live", mentions_bot=True)
                    ids = [str(m["id"]) for m in (first, *missed, live)]
                    await emu.wait_until(lambda: all(answers(emus, channel, i) for i in ids), 20)
                    assert [len(answers(emus, channel, i)) for i in ids] == [1] * len(ids)
                    order = [answers(emus, channel, i)[0].id for i in ids]
                    assert order == sorted(order), "answers out of order"
                    await emu.wait_until(lambda: bool(answers(emus, quiet, str(new["id"]))), 10)
                    assert len(answers(emus, quiet, str(new["id"]))) == 1


async def test_shard_count_auto_takes_discord_s_recommendation_and_holds_every_shard(
    pg_url: str, tmp_path: Path
) -> None:
    """``SHARD_COUNT=auto``: discord.py asks ``GET /gateway/bot`` (the emulator recommends 2) and
    opens a session for each shard in this one process (5 s apart, discord.py's IDENTIFY pace)."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        emus.discord.recommended_shards = 2
        environ = {
            **emus.settings(), **TEST_SETTINGS, "DATA_DIR": str(tmp_path / "a"), "LOG_FORMAT": "console",
            "DATABASE_URL": pg_url, "DATABASE_POOL_SIZE": "4", "SHARD_COUNT": "auto",
        }
        app = build_application(load_config(environ=environ, env_file=None))
        bot = make_bot(app, guild_ready_timeout=0.05, drain_interval=0.05, check_models=False)
        with pointed_at(emus.discord):
            task = asyncio.create_task(bot.start(app.config.discord_token or ""))
            try:
                async with asyncio.timeout(20):
                    while not bot.is_ready():
                        if task.done():
                            task.result()
                        await asyncio.sleep(0.01)
                assert emus.discord.shard_sessions == {0: 1, 1: 1}
                assert app.discord_shards() == {"count": 2, "ids": [0, 1], "open": [0, 1]}
            finally:
                await bot.close()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, 10)
