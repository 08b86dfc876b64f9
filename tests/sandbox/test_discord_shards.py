"""Sharding in the Discord emulator (discord-api-docs ``docs/topics/Gateway.md``, "Sharding"): one
session per shard, a guild's events on shard ``(guild_id >> 22) % num_shards``, DMs on shard 0,
READY and GUILD_CREATE for the shard's guilds only; a raw gateway client and a real
``discord.AutoShardedClient`` against it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord.ext import commands

from sandbox.discord_emu import DiscordEmulator, shard_of
from tests.integration.harness import pointed_at

SHARDS = 3


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    """An emulator whose world has, besides the first guild, one more guild on each of 3 shards."""
    async with DiscordEmulator(heartbeat_interval=10.0) as emulator:
        for shard in range(SHARDS):
            emulator.world.add_guild(f"shard-{shard}", shard=(shard, SHARDS))
        yield emulator


def guilds_on(emu: DiscordEmulator, shard: int) -> set[int]:
    return {gid for gid in emu.world.guilds if shard_of(gid, SHARDS) == shard}


async def identify(
    http: aiohttp.ClientSession, emu: DiscordEmulator, shard: Any
) -> tuple[aiohttp.ClientWebSocketResponse, list[dict[str, Any]]]:
    """IDENTIFY on a raw connection with ``shard``; returns it and READY plus the GUILD_CREATEs."""
    ws = await http.ws_connect(emu.gateway_url)
    await ws.receive_json(timeout=2)  # HELLO
    data: dict[str, Any] = {"token": emu.token, "intents": 1 << 15 | 1 << 9 | 1 << 12, "properties": {}}
    if shard is not None:
        data["shard"] = shard
    await ws.send_json({"op": 2, "d": data})
    ready = await ws.receive_json(timeout=2)
    frames = [ready]
    for _ in ready["d"]["guilds"]:
        frames.append(await ws.receive_json(timeout=2))
    return ws, frames


def test_add_guild_picks_an_id_on_the_shard() -> None:
    """``add_guild(shard=(i, n))`` gives ids whose ``(id >> 22) % n`` is ``i``, and distinct ones."""
    emu = DiscordEmulator()
    ids = [emu.world.add_guild(f"g{n}", shard=(n % 4, 4)) for n in range(12)]
    assert [shard_of(gid, 4) for gid in ids] == [n % 4 for n in range(12)]
    assert len(set(ids)) == 12


async def test_each_shard_session_gets_only_its_guilds_and_dms_to_shard_0(emu: DiscordEmulator) -> None:
    """READY lists the shard's guilds, one GUILD_CREATE each, ``shard`` echoed; a guild message reaches
    only its shard's session and a DM only shard 0's."""
    async with aiohttp.ClientSession() as http:
        sockets = []
        for shard in range(SHARDS):
            ws, frames = await identify(http, emu, [shard, SHARDS])
            sockets.append(ws)
            ready = frames[0]["d"]
            assert ready["shard"] == [shard, SHARDS]
            assert {int(g["id"]) for g in ready["guilds"]} == guilds_on(emu, shard)
            assert [f["t"] for f in frames[1:]] == ["GUILD_CREATE"] * len(guilds_on(emu, shard))
        assert emu.shard_sessions == {0: 1, 1: 1, 2: 1}
        for shard in range(SHARDS):
            [gid] = [g for g in guilds_on(emu, shard) if g != emu.guild_id]
            channel = emu.world.add_text_channel(f"chat-{shard}", guild_id=gid)
            await emu.send_user_message(channel, content=f"hello shard {shard}", mentions_bot=True)
        await emu.send_user_message(emu.dm_channel("normal"), content="a DM")
        for shard, ws in enumerate(sockets):
            got = [await ws.receive_json(timeout=2)]
            if shard == 0:
                got.append(await ws.receive_json(timeout=2))
            texts = [f["d"]["content"].split("> ")[-1] for f in got]
            assert texts == [f"hello shard {shard}", *(["a DM"] if shard == 0 else [])]
            with pytest.raises(asyncio.TimeoutError):
                await ws.receive_json(timeout=0.2)  # nothing else: no other shard's guild
            await ws.close()


async def test_invalid_shard_is_closed_with_4010_and_no_shard_sees_everything(emu: DiscordEmulator) -> None:
    """``shard: [3, 3]`` is closed with 4010 (Invalid shard); an unsharded IDENTIFY sees every guild."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(emu.gateway_url)
        await ws.receive_json(timeout=2)
        identify_data = {"token": emu.token, "intents": 0, "properties": {}, "shard": [3, 3]}
        await ws.send_json({"op": 2, "d": identify_data})
        msg = await ws.receive(timeout=2)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4010
        await ws.close()
        ws, frames = await identify(http, emu, None)
        assert "shard" not in frames[0]["d"]
        assert {int(g["id"]) for g in frames[0]["d"]["guilds"]} == set(emu.world.guilds)
        await ws.close()


async def test_gateway_bot_recommends_shards(emu: DiscordEmulator) -> None:
    """``GET /gateway/bot`` answers ``shards``: one per 1,000 guilds, or ``recommended_shards``."""
    headers = {"Authorization": f"Bot {emu.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{emu.api_base}/gateway/bot", headers=headers) as response:
            assert (await response.json())["shards"] == 1
        emu.recommended_shards = 3
        async with http.get(f"{emu.api_base}/gateway/bot", headers=headers) as response:
            body = await response.json()
    assert body["shards"] == 3 and body["url"] == emu.gateway_url


async def test_auto_sharded_client_holds_its_shards_and_receives_their_guilds(emu: DiscordEmulator) -> None:
    """A real ``commands.AutoShardedBot`` with ``shard_ids=[1, 2]`` of 3 opens two sessions, sees only
    those shards' guilds and receives a message of shard 2's guild, not one of shard 0's."""
    intents = discord.Intents.default()
    intents.message_content = True
    bot = commands.AutoShardedBot(
        command_prefix="!", intents=intents, shard_count=SHARDS, shard_ids=[1, 2], guild_ready_timeout=0.05
    )
    seen: list[str] = []
    got, ready = asyncio.Event(), asyncio.Event()

    @bot.event
    async def on_ready() -> None:
        ready.set()

    @bot.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message.content)
        got.set()

    channels = {}
    for shard in (0, 2):
        [gid] = [g for g in guilds_on(emu, shard) if g != emu.guild_id]
        channels[shard] = emu.world.add_text_channel(f"c{shard}", guild_id=gid)
    with pointed_at(emu):
        runner = asyncio.create_task(bot.start(emu.token))
        try:
            async with asyncio.timeout(10):
                await ready.wait()
            assert emu.shard_sessions == {1: 1, 2: 1}
            assert {g.id for g in bot.guilds} == guilds_on(emu, 1) | guilds_on(emu, 2)
            await emu.send_user_message(channels[0], content="for shard 0")
            await emu.send_user_message(channels[2], content="for shard 2")
            async with asyncio.timeout(5):
                await got.wait()
            await emu.send_user_message(emu.dm_channel("normal"), content="a DM, shard 0")
            await emu.send_user_message(channels[2], content="again shard 2")
            async with asyncio.timeout(5):
                while len(seen) < 2:
                    got.clear()
                    await got.wait()
            assert seen == ["for shard 2", "again shard 2"]
        finally:
            await bot.close()
            await asyncio.wait({runner}, timeout=5)
