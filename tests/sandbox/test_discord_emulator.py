"""The Discord emulator against a real, unpatched discord.py ``commands.Bot``.

Each test points ``Route.BASE`` and ``DEFAULT_GATEWAY`` at a fresh emulator (restored afterwards),
logs a real bot in over loopback and checks what discord.py does and what the emulator recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import discord
import pytest
from discord.ext import commands

from sandbox.discord_emu import DiscordEmulator
from sandbox.discord_state import READ_MESSAGE_HISTORY, VIEW_CHANNEL
from sandbox.faults import FaultPlan
from tests.integration.harness import pointed_at


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    """A started emulator with a 0.1 s heartbeat, discord.py pointed at it."""
    async with DiscordEmulator(faults=FaultPlan(), heartbeat_interval=0.1) as emulator:
        with pointed_at(emulator):
            yield emulator


def make_bot(heartbeat_timeout: float = 5.0, **options: Any) -> commands.Bot:
    intents = discord.Intents.default()
    intents.members = True
    intents.message_content = True
    # heartbeat_timeout bounds how long a silent gateway goes unnoticed
    return commands.Bot(
        command_prefix="!", intents=intents, guild_ready_timeout=0.05, heartbeat_timeout=heartbeat_timeout,
        **options,
    )


class Running:
    """A bot logged in to the emulator, started as a background task."""

    def __init__(self, bot: commands.Bot, task: asyncio.Task[None]) -> None:
        self.bot = bot
        self.task = task


@contextlib.asynccontextmanager
async def running(emu: DiscordEmulator, bot: commands.Bot | None = None) -> AsyncIterator[Running]:
    bot = bot or make_bot()
    await bot.login(emu.token)
    task = asyncio.create_task(bot.connect())
    try:
        async with asyncio.timeout(5):
            await bot.wait_until_ready()
        yield Running(bot, task)
    finally:
        await bot.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


def replying_bot(bot: commands.Bot | None = None, prefix: str = "echo: ") -> commands.Bot:
    """A bot that replies to every human message, without pinging anyone."""
    bot = bot or make_bot()

    async def on_message(message: discord.Message) -> None:
        if message.author.bot:
            return
        await message.reply(prefix + message.content, allowed_mentions=discord.AllowedMentions.none())

    bot.add_listener(on_message)
    return bot


async def test_emulator_starts_fast_and_stops_without_leaked_tasks_or_sockets() -> None:
    """Start takes well under a second; after a bot session, stop leaves no task and no listener."""
    before = asyncio.all_tasks()
    started = time.perf_counter()
    emu = DiscordEmulator(heartbeat_interval=0.1)
    await emu.start()
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, elapsed
    with pointed_at(emu):
        async with running(emu, replying_bot()):
            await emu.send_user_message(emu.channels["general"], content="hi")
            await emu.wait_for_bot_message(emu.channels["general"])
    await emu.stop()
    await emu.stop()  # idempotent
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", emu.port), timeout=1):
        pass


async def test_bot_logs_in_sees_guild_channels_thread_and_cached_members(emu: DiscordEmulator) -> None:
    """READY + GUILD_CREATE: get_guild works, members are cached, the admin has Administrator."""
    async with running(emu) as run:
        bot = run.bot
        assert bot.user is not None and bot.user.id == emu.bot_user_id
        assert bot.application_id == emu.application_id
        guild = bot.get_guild(emu.guild_id)
        assert guild is not None and guild.chunked
        assert {c.name for c in guild.text_channels} == {"general", "random"}
        thread = guild.get_thread(emu.thread_id)
        assert thread is not None and thread.parent_id == emu.channels["general"]
        admin = guild.get_member(emu.users["admin"])
        normal = guild.get_member(emu.users["normal"])
        assert admin is not None and admin.guild_permissions.administrator
        assert normal is not None and not normal.guild_permissions.administrator
        assert emu.identify_count == 1 and emu.connected
        fetched = await bot.fetch_channel(emu.channels["random"])
        assert isinstance(fetched, discord.TextChannel) and fetched.name == "random"
        await admin.send("a DM")  # POST /users/@me/channels, then a send to the new DM channel
    [dm] = emu.sent_messages(emu.dm_channel("admin"))
    assert dm.content == "a DM"
    assert [r.route for r in emu.requests][-3:] == ["channel", "dm", "send"]


async def test_reply_is_recorded_with_allowed_mentions_and_reference(emu: DiscordEmulator) -> None:
    """on_message -> message.reply: the emulator records content, allowed_mentions and the reference."""
    general = emu.channels["general"]
    async with running(emu, replying_bot()):
        sent = await emu.send_user_message(general, "normal", "hello", mentions_bot=True)
        [reply] = await emu.wait_for_bot_message(general)
    assert sent["content"] == f"<@{emu.bot_user_id}> hello"
    assert [m["id"] for m in sent["mentions"]] == [str(emu.bot_user_id)]
    assert reply.content == f"echo: <@{emu.bot_user_id}> hello"
    assert reply.allowed_mentions == {"parse": []}  # discord.py omits replied_user when False
    assert reply.message_reference is not None
    assert int(reply.message_reference["message_id"]) == int(sent["id"])
    assert reply.payload["referenced_message"]["id"] == sent["id"]
    assert [m["id"] for m in emu.history(general)] == [sent["id"], str(reply.id)]


@pytest.mark.parametrize("where", ["dm", "thread"])
async def test_dm_and_thread_messages_reach_the_bot_and_get_answers(emu: DiscordEmulator, where: str) -> None:
    """A DM MESSAGE_CREATE has no guild_id (discord.py sees a DMChannel); a thread's resolves to a Thread."""
    seen: list[discord.Message] = []
    bot = replying_bot()

    async def record(message: discord.Message) -> None:
        seen.append(message)

    bot.add_listener(record, "on_message")
    channel_id = emu.dm_channel("normal") if where == "dm" else emu.thread_id
    async with running(emu, bot):
        data = await emu.send_user_message(channel_id, "normal", "psst")
        [reply] = await emu.wait_for_bot_message(channel_id)
    assert ("guild_id" in data) is (where == "thread")
    assert isinstance(seen[0].channel, discord.DMChannel if where == "dm" else discord.Thread)
    assert reply.content == "echo: psst"


async def test_gateway_close_4000_resumes_and_replays_the_missed_message_exactly_once(
    emu: DiscordEmulator,
) -> None:
    """A 4000 close hits while a message is dispatched; discord.py RESUMEs and answers it once."""
    general = emu.channels["general"]
    async with running(emu, replying_bot()):
        emu.faults.add("close", "gateway", count=1, code=4000)
        await emu.send_user_message(general, content="while away")
        await emu.wait_for_bot_message(general, 1)
        await emu.send_user_message(general, content="after")
        replies = await emu.wait_for_bot_message(general, 2)
        assert [r.content for r in replies] == ["echo: while away", "echo: after"]
        assert (emu.identify_count, emu.resume_count) == (1, 1)


async def test_cut_gateway_connection_resumes_and_replays(emu: DiscordEmulator) -> None:
    """A gateway TCP cut with no close frame (fault "disconnect") ends in a RESUME; nothing is lost."""
    general = emu.channels["general"]
    async with running(emu, replying_bot()):
        emu.faults.add("disconnect", "gateway", count=1)
        await emu.send_user_message(general, content="cut")
        [reply] = await emu.wait_for_bot_message(general, 1)
        assert reply.content == "echo: cut"
        assert (emu.identify_count, emu.resume_count) == (1, 1)


async def test_op7_reconnect_and_silent_gateway_both_lead_to_resume(emu: DiscordEmulator) -> None:
    """op 7 RECONNECT and a gateway that stops ACKing heartbeats both end in a RESUME, nothing lost."""
    general = emu.channels["general"]
    # a short heartbeat_timeout so the silent gateway is noticed quickly (ACKs come every 0.1 s)
    async with running(emu, replying_bot(make_bot(heartbeat_timeout=0.5))):
        await emu.send_reconnect()
        await emu.wait_until(lambda: emu.resume_count == 1)
        emu.faults.add("silent", "gateway", count=1)
        await emu.send_user_message(general, content="into the void")
        [reply] = await emu.wait_for_bot_message(general, 1, timeout=5)
        assert reply.content == "echo: into the void"
        assert (emu.identify_count, emu.resume_count) == (1, 2)


async def test_close_4004_ends_bot_connect_with_connection_closed(emu: DiscordEmulator) -> None:
    """Close code 4004 (authentication failed) is fatal: bot.connect() raises ConnectionClosed."""
    bot = make_bot()
    await bot.login(emu.token)
    task = asyncio.create_task(bot.connect())
    async with asyncio.timeout(5):
        await bot.wait_until_ready()
    await emu.close_gateway(4004)
    with pytest.raises(discord.ConnectionClosed) as info:
        await asyncio.wait_for(task, 5)
    assert info.value.code == 4004
    assert bot.is_closed()


async def test_identify_with_wrong_token_is_closed_with_4004(emu: DiscordEmulator) -> None:
    """A raw gateway client sending a wrong token in IDENTIFY gets close code 4004 after HELLO."""
    async with aiohttp.ClientSession() as session, session.ws_connect(emu.gateway_url) as ws:
        hello = await ws.receive_json(timeout=2)
        assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] == 100
        await ws.send_str(json.dumps({"op": 2, "d": {"token": "wrong", "intents": 0, "properties": {}}}))
        msg = await ws.receive(timeout=2)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4004


async def test_wrong_token_raises_login_failure(emu: DiscordEmulator) -> None:
    """REST 401 on GET /users/@me becomes discord.LoginFailure."""
    bot = make_bot()
    with pytest.raises(discord.LoginFailure):
        await bot.login("not-the-token")
    await bot.close()
    [request] = emu.requests
    assert (request.route, request.status) == ("me", 401)


async def test_slash_command_deferred_then_ephemeral_followup_is_recorded(emu: DiscordEmulator) -> None:
    """An app command synced, invoked through INTERACTION_CREATE, defers ephemerally and follows up."""
    bot = make_bot()
    seen: dict[str, Any] = {}

    @bot.tree.command(name="ask", description="Ask the bot")
    async def ask(interaction: discord.Interaction, question: str) -> None:
        seen["admin"] = interaction.permissions.administrator
        seen["user"] = interaction.user.id
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(f"answer to {question}", ephemeral=True)

    async with running(emu, bot):
        synced = await bot.tree.sync()
        assert [c.name for c in synced] == ["ask"]
        assert emu.commands[None][0]["options"][0]["name"] == "question"
        guild = discord.Object(emu.guild_id)
        bot.tree.copy_global_to(guild=guild)
        assert [c.guild_id for c in await bot.tree.sync(guild=guild)] == [emu.guild_id]
        assert emu.commands[emu.guild_id][0]["name"] == "ask"
        record = await emu.send_interaction("ask", {"question": "why"}, user="admin")
        await emu.wait_until(lambda: len(record.followups) == 1)
    assert seen == {"admin": True, "user": emu.users["admin"]}
    assert record.deferred and record.ephemeral
    assert [kind for kind, _ in record.events] == ["callback", "followup"]
    assert record.followups[0].content == "answer to why" and record.followups[0].ephemeral
    assert emu.sent_messages(emu.channels["general"]) == []  # ephemeral: not in the channel
    assert emu.interaction_log(record.id) is record


async def test_interaction_message_response_and_original_edit(emu: DiscordEmulator) -> None:
    """A type 4 response then an @original edit are both recorded, in order, for a normal member."""
    bot = make_bot()

    @bot.tree.command(name="ping", description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        assert not interaction.permissions.administrator
        await interaction.response.send_message("pong")
        await interaction.edit_original_response(content="pong!")

    async with running(emu, bot):
        record = await emu.send_interaction("ping")
        await emu.wait_until(lambda: any(kind == "edit_original" for kind, _ in record.events))
    assert record.callback_type == 4 and not record.ephemeral
    assert record.texts() == ["pong", "pong!"]
    assert record.original is not None and record.original["content"] == "pong!"


async def test_rest_429_with_via_is_retried_by_discord_py(emu: DiscordEmulator) -> None:
    """A 429 carrying Via and retry_after 0.05 is retried by discord.py; the send succeeds."""
    general = emu.channels["general"]
    async with running(emu) as run:
        emu.faults.add("429", "send", count=1, retry_after=0.05)
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        message = await channel.send("hi")
    assert message.content == "hi"
    assert [r.status for r in emu.requests_for("send")] == [429, 200]


async def test_rest_503_raises_discord_server_error(emu: DiscordEmulator) -> None:
    """503 is not retried by discord.py: the caller gets DiscordServerError, the message is not stored."""
    general = emu.channels["general"]
    async with running(emu) as run:
        emu.faults.add("503", "send", count=1)
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.DiscordServerError) as info:
            await channel.send("hi")
    assert info.value.status == 503
    assert [r.status for r in emu.requests_for("send")] == [503]
    assert emu.sent_messages(general) == []


async def test_rest_500_once_is_retried_once_and_succeeds(emu: DiscordEmulator) -> None:
    """A single 500 is retried by discord.py after its 1 s back-off; the second attempt succeeds."""
    general = emu.channels["general"]
    async with running(emu) as run:
        emu.faults.add("500", "react", count=1)
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        data = await emu.send_user_message(general, content="react to me")
        message = await channel.fetch_message(int(data["id"]))
        await message.add_reaction("👍")
    assert [r.status for r in emu.requests_for("react")] == [500, 204]
    assert emu.reactions(int(data["id"])) == {"👍": {emu.bot_user_id}}


async def test_dropped_connection_surfaces_as_aiohttp_error_and_typing_is_recorded(
    emu: DiscordEmulator,
) -> None:
    """A dropped TCP connection reaches the caller as an aiohttp error; the next request works."""
    general = emu.channels["general"]
    async with running(emu) as run:
        emu.faults.add("drop", "typing", count=1)
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(aiohttp.ClientError):
            await channel.typing()
        await channel.typing()
    assert [r.status for r in emu.requests_for("typing")] == [None, 204]
    assert emu.typing == [general]


async def test_too_long_and_empty_messages_are_rejected_like_discord(emu: DiscordEmulator) -> None:
    """Over 2000 characters -> 400 code 50035; empty -> 400 code 50006 (both HTTPException)."""
    async with running(emu) as run:
        channel = run.bot.get_channel(emu.channels["random"])
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        with pytest.raises(discord.HTTPException) as empty:
            await channel.send("")
    assert (too_long.value.status, too_long.value.code) == (400, 50035)
    assert (empty.value.status, empty.value.code) == (400, 50006)


@pytest.mark.parametrize("blank", [" " * 1999 + "\n", "\n" * 2000, " \t\r\n\u3000\u00a0"])
async def test_whitespace_only_content_is_an_empty_message_like_discord(
    emu: DiscordEmulator, blank: str
) -> None:
    """Discord refuses content that is only whitespace (400, 50006), on create and on edit, unless an
    embed carries the message; a zero-width space is no whitespace and is posted."""
    random_id = emu.channels["random"]
    async with running(emu) as run:
        channel = run.bot.get_channel(random_id)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as refused:
            await channel.send(blank)
        posted = await channel.send("first")
        with pytest.raises(discord.HTTPException) as edit_refused:
            await posted.edit(content=blank)
        with_embed = await channel.send(blank, embed=discord.Embed(description="shown"))
        zero_width = await channel.send("\u200b")
    assert (refused.value.status, refused.value.code) == (400, 50006)
    assert (edit_refused.value.status, edit_refused.value.code) == (400, 50006)
    assert [m.id for m in emu.sent_messages(random_id)] == [posted.id, with_embed.id, zero_width.id]
    assert emu.sent_messages(random_id)[0].content == "first"


async def test_without_message_content_intent_guild_content_is_blanked(emu: DiscordEmulator) -> None:
    """Like Discord: without the intent a bot sees guild content only when mentioned (and in DMs)."""
    intents = discord.Intents.default()
    bot = commands.Bot(command_prefix="!", intents=intents, guild_ready_timeout=0.05)
    got: list[str] = []
    arrived = asyncio.Event()

    async def on_message(message: discord.Message) -> None:
        got.append(message.content)
        if len(got) == 2:
            arrived.set()

    bot.add_listener(on_message)
    async with running(emu, bot):
        await emu.send_user_message(emu.channels["general"], content="secret")
        await emu.send_user_message(emu.channels["general"], content="hey", mentions_bot=True)
        async with asyncio.timeout(5):
            await arrived.wait()
    assert got == ["", f"<@{emu.bot_user_id}> hey"]


async def test_wait_for_bot_message_times_out_when_nothing_is_sent(emu: DiscordEmulator) -> None:
    """The wait helper raises TimeoutError instead of hanging when the bot says nothing."""
    with pytest.raises(TimeoutError):
        await emu.wait_for_bot_message(emu.channels["general"], timeout=0.05)


async def test_invalid_session_makes_discord_py_identify_again(emu: DiscordEmulator) -> None:
    """op 9 (not resumable) -> discord.py re-IDENTIFYs (after its fixed 5 s wait) and gets READY."""
    # nobody reads the socket during discord.py's 5 s pre-IDENTIFY sleep: a short timeout would fire
    bot = replying_bot(make_bot(heartbeat_timeout=60.0))
    async with running(emu, bot):
        await emu.invalidate_session(resumable=False)
        await emu.wait_until(lambda: emu.identify_count == 2 and emu.connected, timeout=8)
        await emu.send_user_message(emu.channels["general"], content="back")
        [reply] = await emu.wait_for_bot_message(emu.channels["general"])
    assert reply.content == "echo: back" and emu.resume_count == 0



async def test_edit_delete_history_and_file_upload_through_discord_py(emu: DiscordEmulator) -> None:
    """message.edit / delete, channel.history and a file upload are served and recorded."""
    random_id = emu.channels["random"]
    async with running(emu) as run:
        channel = run.bot.get_channel(random_id)
        assert isinstance(channel, discord.TextChannel)
        first = await channel.send("one")
        second = await channel.send("two", file=discord.File(__file__, filename="notes.txt"))
        await first.edit(content="one, edited")
        history = [m.content async for m in channel.history(limit=10)]
        await second.delete()
    assert history == ["two", "one, edited"]
    sent = emu.sent_messages(random_id)
    assert [(m.content, m.deleted) for m in sent] == [("one, edited", False), ("two", True)]
    assert [e["content"] for e in sent[0].edits] == ["one, edited"]
    assert sent[1].attachments == ["notes.txt"]
    assert [m["content"] for m in emu.history(random_id)] == ["one, edited"]


async def test_global_429_and_latency_faults(emu: DiscordEmulator) -> None:
    """A global 429 is waited out by discord.py; a latency fault delays the answer but serves it."""
    async with running(emu) as run:
        channel = run.bot.get_channel(emu.channels["general"])
        assert isinstance(channel, discord.TextChannel)
        emu.faults.add("429", "send", count=1, retry_after=0.05, **{"global": True})
        await channel.send("after a global limit")
        emu.faults.add("latency", "send", count=1, seconds=0.05)
        started = time.perf_counter()
        await channel.send("slow")
        assert time.perf_counter() - started >= 0.05
    assert [r.status for r in emu.requests_for("send")] == [429, 200, 200]
    assert [r.fault for r in emu.requests_for("send")] == ["429", None, "latency"]


async def test_resume_replays_only_missed_events_and_fails_beyond_the_buffer() -> None:
    """Raw gateway client: RESUME replays exactly the events after its seq then RESUMED; once the
    bounded buffer has dropped a missed event the emulator answers INVALID_SESSION instead."""
    emulator = DiscordEmulator(buffer_size=4, heartbeat_interval=10.0)
    async with emulator as emu, aiohttp.ClientSession() as http:
        async with http.ws_connect(emu.gateway_url) as ws:
            await ws.receive_json(timeout=2)  # HELLO
            await ws.send_json({"op": 2, "d": {"token": emu.token, "intents": 0, "properties": {}}})
            ready = await ws.receive_json(timeout=2)
            guild = await ws.receive_json(timeout=2)
            assert (ready["t"], ready["s"], guild["t"], guild["s"]) == ("READY", 1, "GUILD_CREATE", 2)
            session_id = ready["d"]["session_id"]
            assert ready["d"]["resume_gateway_url"] == emu.gateway_url
            await ws.close(code=4000)  # not 1000/1001, which would end the session (Discord's rule)
        await emu.wait_until(lambda: not emu.connected)
        for n in range(2):
            await emu.send_user_message(emu.channels["general"], content=f"missed {n}")

        async def resume(seq: int) -> list[dict[str, Any]]:
            async with http.ws_connect(emu.gateway_url) as ws:
                await ws.receive_json(timeout=2)
                await ws.send_json({"op": 6, "d": {"token": emu.token, "session_id": session_id, "seq": seq}})
                frames = [await ws.receive_json(timeout=2)]
                while frames[-1].get("t") not in ("RESUMED", None):
                    frames.append(await ws.receive_json(timeout=2))
                await ws.close(code=4000)  # keep the session resumable
                return frames

        frames = await resume(2)
        assert [(f["t"], f["s"]) for f in frames] == [
            ("MESSAGE_CREATE", 3), ("MESSAGE_CREATE", 4), ("RESUMED", 5)
        ]
        assert frames[0]["d"]["content"] == ""  # no message-content intent, no mention: blanked
        await emu.wait_until(lambda: not emu.connected)
        for n in range(3):
            await emu.send_user_message(emu.channels["general"], content=f"overflow {n}")
        frames = await resume(5)  # the buffer holds 5..8: everything after 5 is still there
        assert [f["s"] for f in frames] == [6, 7, 8, 9]
        await emu.wait_until(lambda: not emu.connected)
        for n in range(5):
            await emu.send_user_message(emu.channels["general"], content=f"too many {n}")
        frames = await resume(9)  # 10..14 happened, the buffer keeps 11..14: 10 is lost
        assert frames == [{"op": 9, "d": False}]


async def test_stop_with_a_connected_bot_returns_promptly(emu: DiscordEmulator) -> None:
    """stop() closes live websockets itself and does not wait on the connected client."""
    bot = make_bot()
    async with running(emu, bot):
        started = time.perf_counter()
        await emu.stop()
        assert time.perf_counter() - started < 1.5
        assert not emu.connected


async def test_pings_follow_discords_allowed_mentions_rules(emu: DiscordEmulator) -> None:
    """Without allowed_mentions everything in the text pings (and a reply pings its author); with
    it only what it allows. The recorded message says who would have been notified."""
    general = emu.channels["general"]
    admin = emu.users["admin"]
    text = f"@everyone look <@{admin}> <@&{emu.guild_id}>"
    async with running(emu) as run:
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        await channel.send(text)
        await channel.send(text, allowed_mentions=discord.AllowedMentions(everyone=False, roles=False))
        data = await emu.send_user_message(general, "normal", "question")
        message = await channel.fetch_message(int(data["id"]))
        await message.reply("default reply")
        await message.reply("quiet reply", allowed_mentions=discord.AllowedMentions.none())
    sent = emu.sent_messages(general)
    assert sent[0].pings == {"everyone", f"user:{admin}", f"role:{emu.guild_id}"}
    assert sent[0].payload["mention_everyone"] and sent[0].payload["mentions"][0]["id"] == str(admin)
    assert sent[1].pings == {f"user:{admin}"}
    assert sent[2].pings == {f"user:{emu.users['normal']}"}
    assert sent[3].pings == set()


async def test_interaction_acknowledged_after_the_deadline_is_unknown(emu: DiscordEmulator) -> None:
    """Like Discord's 3 s rule (here 0 s, so no test waits): a late first response gets 404 10062."""
    emu.interaction_deadline = 0.0
    bot = make_bot()
    errors: list[discord.HTTPException] = []
    done = asyncio.Event()

    @bot.tree.command(name="slow", description="Too slow")
    async def slow(interaction: discord.Interaction) -> None:
        try:
            await interaction.response.send_message("late")
        except discord.HTTPException as exc:
            errors.append(exc)
        finally:
            done.set()

    async with running(emu, bot):
        record = await emu.send_interaction("slow")
        async with asyncio.timeout(5):
            await done.wait()
    assert [(e.status, e.code) for e in errors] == [(404, 10062)]
    assert not record.acknowledged


async def test_nested_options_reach_an_app_commands_group_subcommand(emu: DiscordEmulator) -> None:
    """``{"circuit": {"reset": {"name": "gemini"}}}`` runs ``/admin circuit reset name:gemini``;
    ``{"status": {}}`` runs the group's option-less ``/admin status``."""
    bot = make_bot()
    calls: list[tuple[str, Any]] = []
    admin = discord.app_commands.Group(name="admin", description="Operator commands")
    circuit = discord.app_commands.Group(name="circuit", description="Breakers", parent=admin)

    @circuit.command(name="reset", description="Reset a breaker")
    async def reset(interaction: discord.Interaction, name: str) -> None:
        calls.append(("reset", name))
        await interaction.response.send_message(f"reset {name}", ephemeral=True)

    @admin.command(name="status", description="Status")
    async def status(interaction: discord.Interaction) -> None:
        calls.append(("status", None))
        await interaction.response.send_message("all fine", ephemeral=True)

    bot.tree.add_command(admin)
    async with running(emu, bot):
        await bot.tree.sync()
        [synced] = emu.commands[None]
        assert {o["name"]: o["type"] for o in synced["options"]} == {"circuit": 2, "status": 1}
        record = await emu.send_interaction("admin", {"circuit": {"reset": {"name": "gemini"}}}, user="admin")
        await emu.wait_until(lambda: record.acknowledged)
        second = await emu.send_interaction("admin", {"status": {}}, user="admin")
        await emu.wait_until(lambda: second.acknowledged)
    [group] = record.payload["data"]["options"]
    assert group == {"name": "circuit", "type": 2, "options": [
        {"name": "reset", "type": 1, "options": [{"name": "name", "type": 3, "value": "gemini"}]}]}
    assert calls == [("reset", "gemini"), ("status", None)]
    assert record.texts() == ["reset gemini"] and second.texts() == ["all fine"]


async def test_error_fault_with_code_and_message_raises_forbidden_with_that_code(
    emu: DiscordEmulator,
) -> None:
    """``error`` with ``status=403, code=50013`` answers Discord's JSON body; discord.py raises Forbidden."""
    general = emu.channels["general"]
    async with running(emu) as run:
        emu.faults.add("error", "send", count=1, status=403, code=50013, message="Missing Permissions")
        emu.faults.add("error", "typing", count=1, status=404)
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.Forbidden) as info:
            await channel.send("hi")
        with pytest.raises(discord.NotFound) as missing:
            await channel.typing()
        sent = await channel.send("after the fault")
    assert (info.value.status, info.value.code, info.value.text) == (403, 50013, "Missing Permissions")
    assert (missing.value.code, missing.value.text) == (0, "404: Not Found")
    assert [r.status for r in emu.requests_for("send")] == [403, 200]
    assert [m.id for m in emu.sent_messages(general)] == [sent.id]


async def test_redelivered_message_create_reaches_the_bot_again_with_the_same_id(
    emu: DiscordEmulator,
) -> None:
    """``redeliver_message`` repeats a stored MESSAGE_CREATE: the client sees one id twice."""
    bot = make_bot()
    seen: list[int] = []

    async def on_message(message: discord.Message) -> None:
        seen.append(message.id)

    bot.add_listener(on_message)
    general = emu.channels["general"]
    async with running(emu, bot):
        data = await emu.send_user_message(general, content="once")
        await emu.redeliver_message(general, int(data["id"]))
        await emu.wait_until(lambda: len(seen) == 2)
        with pytest.raises(KeyError):
            await emu.redeliver_message(general, 1)
    assert seen == [int(data["id"])] * 2


async def test_latency_after_posts_the_message_at_once_and_answers_late(emu: DiscordEmulator) -> None:
    """``latency`` with ``after=True``: the message is in the channel while the client still
    waits for the response (a sender that dies then has posted without knowing it)."""
    general = emu.channels["general"]
    async with running(emu) as run:
        emu.faults.add("latency", "send", count=1, seconds=0.3, after=True)
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        sending = asyncio.create_task(channel.send("posted early"))
        await emu.wait_until(lambda: len(emu.sent_messages(general)) == 1, timeout=0.25)
        assert not sending.done()
        message = await sending
    assert [m.id for m in emu.sent_messages(general)] == [message.id]
    assert [(r.fault, r.status) for r in emu.requests_for("send")] == [("latency", 200)]


async def test_a_resend_with_the_same_enforced_nonce_returns_the_first_message(emu: DiscordEmulator) -> None:
    """discord.py sends ``nonce`` with ``enforce_nonce``: a repeat within the window posts nothing new
    and returns the message already created (Discord's safe resend); another nonce posts again."""
    general = emu.channels["general"]
    async with running(emu) as run:
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        first = await channel.send("answer", nonce="item-7-0")
        again = await channel.send("answer", nonce="item-7-0")
        other = await channel.send("answer", nonce="item-7-1")
        history = [m async for m in channel.history(limit=10)]
        fetched = await channel.fetch_message(first.id)
    assert again.id == first.id and other.id != first.id
    assert first.nonce == again.nonce == "item-7-0"  # the create response carries it...
    assert [m.id for m in emu.sent_messages(general)] == [first.id, other.id]
    # ... but Discord does not store it: history and a fetch never return it.
    assert [m.nonce for m in history] == [None, None] and fetched.nonce is None


async def test_a_reply_to_a_deleted_message_without_fail_if_not_exists_is_posted_as_a_plain_message(
    emu: DiscordEmulator,
) -> None:
    """Like Discord: with fail_if_not_exists=false the message goes out, without a reference."""
    general = emu.channels["general"]
    async with running(emu) as run:
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        gone = discord.MessageReference(message_id=12345, channel_id=general, fail_if_not_exists=False)
        sent = await channel.send("late answer", reference=gone)
        [fetched] = [m async for m in channel.history(limit=1)]
    assert sent.reference is None and fetched.reference is None and fetched.content == "late answer"


# -- gateway sessions expire (Discord: a dropped session times out "after a few minutes") ---------


async def raw_identify(http: aiohttp.ClientSession, emu: DiscordEmulator) -> tuple[str, int]:
    """IDENTIFY on a raw connection, read READY and the GUILD_CREATE, close without a close frame
    of our own (the emulator cuts the TCP); returns the session id and the last sequence number."""
    async with http.ws_connect(emu.gateway_url) as ws:
        await ws.receive_json(timeout=2)  # HELLO
        await ws.send_json({"op": 2, "d": {"token": emu.token, "intents": 0, "properties": {}}})
        ready = await ws.receive_json(timeout=2)
        guild = await ws.receive_json(timeout=2)
        emu.cut_gateway()  # a network failure: the session stays resumable for a while
    await emu.wait_until(lambda: not emu.connected)
    return ready["d"]["session_id"], guild["s"]


async def raw_resume(
    http: aiohttp.ClientSession, emu: DiscordEmulator, session_id: str, seq: int
) -> list[Any]:
    """RESUME on a new raw connection; the frames up to RESUMED or op 9."""
    async with http.ws_connect(emu.gateway_url) as ws:
        await ws.receive_json(timeout=2)  # HELLO
        await ws.send_json({"op": 6, "d": {"token": emu.token, "session_id": session_id, "seq": seq}})
        frames = [await ws.receive_json(timeout=2)]
        while frames[-1].get("t") not in ("RESUMED", None):
            frames.append(await ws.receive_json(timeout=2))
        return frames


async def test_a_resume_within_the_session_lifetime_replays_what_was_missed() -> None:
    """Within ``session_lifetime`` of the drop, a RESUME replays the missed MESSAGE_CREATE."""
    emulator = DiscordEmulator(heartbeat_interval=10.0, session_lifetime=30.0)
    async with emulator as emu, aiohttp.ClientSession() as http:
        session_id, seq = await raw_identify(http, emu)
        await emu.send_user_message(emu.channels["general"], content="while away")
        frames = await raw_resume(http, emu, session_id, seq)
    assert [f["t"] for f in frames] == ["MESSAGE_CREATE", "RESUMED"]
    assert emu.expired_sessions == 0


async def test_a_resume_after_the_session_expired_gets_op9_and_nothing_is_replayed() -> None:
    """Past ``session_lifetime`` the dropped session is gone with what it buffered: a RESUME gets
    op 9 Invalid Session with ``d: false``, and a message sent before or after the expiry is
    never delivered to that client (only a fresh IDENTIFY gets new events)."""
    emulator = DiscordEmulator(heartbeat_interval=10.0, session_lifetime=0.2)
    async with emulator as emu, aiohttp.ClientSession() as http:
        session_id, seq = await raw_identify(http, emu)
        await emu.send_user_message(emu.channels["general"], content="buffered, then lost")
        await emu.wait_until(lambda: emu.live_sessions == 0, timeout=2)
        await emu.send_user_message(emu.channels["general"], content="after the expiry")
        frames = await raw_resume(http, emu, session_id, seq)
        assert frames == [{"op": 9, "d": False}]
        assert emu.expired_sessions == 1 and emu.resume_count == 0
        async with http.ws_connect(emu.gateway_url) as ws:  # a fresh session sees only what comes next
            await ws.receive_json(timeout=2)
            await ws.send_json({"op": 2, "d": {"token": emu.token, "intents": 0, "properties": {}}})
            assert [(await ws.receive_json(timeout=2))["t"] for _ in range(2)] == ["READY", "GUILD_CREATE"]
            await emu.send_user_message(emu.channels["general"], content="new")
            event = await ws.receive_json(timeout=2)
    assert (event["t"], event["s"]) == ("MESSAGE_CREATE", 3)


async def test_a_client_that_closes_with_1000_ends_its_session_at_once() -> None:
    """Close code 1000 (or 1001) from the client ends the session: no RESUME afterwards (op 9)."""
    emulator = DiscordEmulator(heartbeat_interval=10.0, session_lifetime=60.0)
    async with emulator as emu, aiohttp.ClientSession() as http:
        async with http.ws_connect(emu.gateway_url) as ws:
            await ws.receive_json(timeout=2)
            await ws.send_json({"op": 2, "d": {"token": emu.token, "intents": 0, "properties": {}}})
            ready = await ws.receive_json(timeout=2)
            guild = await ws.receive_json(timeout=2)
            await ws.close(code=1000)
        await emu.wait_until(lambda: emu.live_sessions == 0, timeout=2)
        frames = await raw_resume(http, emu, ready["d"]["session_id"], guild["s"])
    assert frames == [{"op": 9, "d": False}]


async def test_an_unavailable_gateway_refuses_connections_until_the_fault_ends(emu: DiscordEmulator) -> None:
    """Fault ``unavailable`` on ``gateway``: the websocket upgrade gets a 503 while it lasts."""
    fault = emu.faults.add("unavailable", "gateway")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(emu.gateway_url)
        assert info.value.status == 503
        emu.faults.remove(fault.id)
        async with http.ws_connect(emu.gateway_url) as ws:
            assert (await ws.receive_json(timeout=2))["op"] == 10


async def test_discord_py_identifies_afresh_after_an_expired_session_and_dispatches_ready_not_resumed(
    emu: DiscordEmulator,
) -> None:
    """The connection drops and stays down past the session's lifetime. discord.py tries to RESUME,
    gets op 9, waits its 5 s and IDENTIFIEs: ``on_connect`` and ``on_ready`` fire again and
    ``on_resumed`` never does (discord.py 2.7 ``state.py``: ``parse_ready`` dispatches ``connect``
    and, once the guilds arrived, ``ready``; only ``parse_resumed`` dispatches ``resumed``). The
    message sent while it was away never reaches it."""
    emu.session_lifetime = 0.2
    bot = make_bot(heartbeat_timeout=60.0)  # nobody reads the socket during the 5 s before IDENTIFY
    events: list[str] = []
    seen: list[str] = []

    def record(name: str) -> Callable[[], Awaitable[None]]:
        async def listener() -> None:
            events.append(name)

        return listener

    for name in ("connect", "ready", "resumed"):
        bot.add_listener(record(name), f"on_{name}")

    async def on_message(message: discord.Message) -> None:
        seen.append(message.content)

    bot.add_listener(on_message)
    general = emu.channels["general"]
    async with running(emu, bot):
        await emu.wait_until(lambda: events == ["connect", "ready"])
        outage = emu.faults.add("unavailable", "gateway")
        emu.cut_gateway()
        await emu.wait_until(lambda: emu.live_sessions == 0, timeout=2)
        await emu.send_user_message(general, content="while away")
        emu.faults.remove(outage.id)
        await emu.wait_until(lambda: emu.identify_count == 2 and emu.connected, timeout=20)
        await emu.wait_until(lambda: len(events) == 4, timeout=5)
        await emu.send_user_message(general, content="back")
        await emu.wait_until(lambda: seen == ["back"], timeout=5)
    assert events == ["connect", "ready", "connect", "ready"]
    assert emu.resume_count == 0 and emu.expired_sessions == 1


# -- interaction tokens expire; DMs can be closed; Read Message History can be missing ----------


async def test_an_interaction_token_works_for_its_lifetime_then_every_webhook_call_gets_401_50027(
    emu: DiscordEmulator,
) -> None:
    """Discord's interaction tokens last 15 minutes (``interaction_token_lifetime`` here): a
    follow-up in time is posted; after that a follow-up, and an edit of the original response,
    raise discord.py's HTTPException 401 with code 50027 (Invalid Webhook Token)."""
    bot = make_bot()
    errors: list[discord.HTTPException] = []
    done = asyncio.Event()

    @bot.tree.command(name="slow", description="Answers late")
    async def slow(interaction: discord.Interaction) -> None:
        try:
            await interaction.response.defer(thinking=True)
            await interaction.followup.send("in time")
            emu.interaction_token_lifetime = 0.0  # as if 15 minutes had passed
            for late in (interaction.followup.send("too late"),
                         interaction.edit_original_response(content="too late")):
                try:
                    await late
                except discord.HTTPException as exc:
                    errors.append(exc)
        finally:
            done.set()

    async with running(emu, bot):
        record = await emu.send_interaction("slow")
        async with asyncio.timeout(5):
            await done.wait()
    assert [(e.status, e.code, e.text) for e in errors] == [(401, 50027, "Invalid Webhook Token")] * 2
    assert [f.content for f in record.followups] == ["in time"]
    assert [r.status for r in emu.requests_for("followup")] == [200, 401, 401]


async def test_a_user_who_accepts_no_dms_gets_none_the_dm_channel_still_opens(emu: DiscordEmulator) -> None:
    """``world.close_dms``: opening the DM works, sending there raises Forbidden 50007 (Cannot send
    messages to this user); other users' DMs are unaffected."""
    emu.world.close_dms("normal")
    async with running(emu) as run:
        normal, admin = run.bot.get_user(emu.users["normal"]), run.bot.get_user(emu.users["admin"])
        assert normal is not None and admin is not None
        closed, open_ = await normal.create_dm(), await admin.create_dm()
        with pytest.raises(discord.Forbidden) as info:
            await closed.send("hello?")
        await open_.send("hello")
    refused = (info.value.status, info.value.code, info.value.text)
    assert refused == (403, 50007, "Cannot send messages to this user")
    assert emu.sent_messages(closed.id) == []
    assert [m.content for m in emu.sent_messages(open_.id)] == ["hello"]


async def test_without_read_message_history_reading_a_channel_is_refused_with_50001(
    emu: DiscordEmulator,
) -> None:
    """A member overwrite denies the bot Read Message History in #random: discord.py sees the
    permission missing, ``history()`` and ``fetch_message`` raise Forbidden 50001 (Missing
    Access), sending there still works, and #general (where @everyone loses View Channel but the
    bot's role gets it back) reads fine."""
    random_id, general_id = emu.channels["random"], emu.channels["general"]
    emu.world.set_overwrite(random_id, emu.bot_user_id, deny=READ_MESSAGE_HISTORY)
    emu.world.set_overwrite(general_id, emu.guild_id, deny=VIEW_CHANNEL)
    emu.world.set_overwrite(general_id, emu.world.bot_role_id, allow=VIEW_CHANNEL)
    async with running(emu) as run:
        random_ = run.bot.get_channel(random_id)
        general = run.bot.get_channel(general_id)
        assert isinstance(random_, discord.TextChannel) and isinstance(general, discord.TextChannel)
        assert not random_.permissions_for(random_.guild.me).read_message_history
        posted = await random_.send("I can still talk here")
        with pytest.raises(discord.Forbidden) as listing:
            [m async for m in random_.history(limit=5)]
        with pytest.raises(discord.Forbidden) as one:
            await random_.fetch_message(posted.id)
        await general.send("readable")
        assert [m.content async for m in general.history(limit=5)] == ["readable"]
    assert [(e.value.status, e.value.code) for e in (listing, one)] == [(403, 50001)] * 2


async def test_fetch_user_gets_any_user_of_the_world_and_404_10013_otherwise(emu: DiscordEmulator) -> None:
    """``GET /users/{id}``: how a bot without the members intent learns a user it must DM."""
    async with running(emu) as run:
        user = await run.bot.fetch_user(emu.users["normal"])
        with pytest.raises(discord.NotFound) as info:
            await run.bot.fetch_user(1)
    assert (user.id, user.name) == (emu.users["normal"], "bob")
    assert info.value.code == 10013


@pytest.mark.parametrize("deleted_by", ["moderator", "bot"])
async def test_a_resend_with_the_nonce_of_a_deleted_message_is_unknown_message(
    emu: DiscordEmulator, deleted_by: str
) -> None:
    """Discord does not re-create a message whose nonce it saw if that message was deleted since:
    the resend within the window gets 404 Unknown Message (10008) and posts nothing."""
    general = emu.channels["general"]
    async with running(emu) as run:
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        first = await channel.send("answer", nonce="item-8-0")
        if deleted_by == "moderator":
            await emu.delete_message(general, first.id)
        else:
            await first.delete()
        with pytest.raises(discord.NotFound) as info:
            await channel.send("answer", nonce="item-8-0")
        other = await channel.send("answer", nonce="item-8-1")
    assert (info.value.status, info.value.code) == (404, 10008)
    assert [m.id for m in emu.sent_messages(general)] == [first.id, other.id]
    assert emu.sent_messages(general)[0].deleted
    assert [m["id"] for m in emu.history(general)] == [str(other.id)]


# --- rate limits ---------------------------------------------------------------------------------


class StepClock:
    """A monotonic clock for the emulator's buckets that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def raw(emu: DiscordEmulator, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    """One REST call with the bot's token from a plain aiohttp client: (status, JSON, headers)."""
    headers = {"Authorization": f"Bot {emu.token}"}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, emu.api_base + path, json=body, headers=headers) as response:
            return response.status, await response.json(content_type=None), response.headers


RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Reset-After",
                "X-RateLimit-Bucket")


async def test_every_answer_carries_the_rate_limit_headers_of_its_route_and_channel() -> None:
    """Like Discord: limit, remaining, reset (epoch), reset-after and the bucket on every answer, also
    an error; one bucket hash per route whatever the channel, a count per channel."""
    async with DiscordEmulator(clock=StepClock()) as emu:
        general, random_id = emu.channels["general"], emu.channels["random"]
        emu.rate_limits.set("send", 5, 5.0)
        answers = [
            await raw(emu, "POST", f"/channels/{general}/messages", {"content": "one"}),
            await raw(emu, "POST", f"/channels/{general}/messages", {"content": "two"}),
            await raw(emu, "POST", f"/channels/{random_id}/messages", {"content": "three"}),
            await raw(emu, "POST", f"/channels/{general}/messages", {"content": " "}),  # 400 50006
            await raw(emu, "POST", f"/channels/{general}/typing"),
            await raw(emu, "GET", f"/channels/{general}"),
        ]
        started = time.time()
    for _, _, headers in answers:
        assert all(name in headers for name in RATE_HEADERS), dict(headers)
    sends = [headers for _, _, headers in answers[:4]]
    assert [h["X-RateLimit-Limit"] for h in sends] == ["5"] * 4
    assert [h["X-RateLimit-Remaining"] for h in sends] == ["4", "3", "4", "2"]  # the error counts too
    assert [float(h["X-RateLimit-Reset-After"]) for h in sends] == [5.0] * 4
    assert abs(float(sends[0]["X-RateLimit-Reset"]) - (started + 5.0)) < 2.0
    assert len({h["X-RateLimit-Bucket"] for h in sends}) == 1
    assert answers[4][2]["X-RateLimit-Bucket"] != sends[0]["X-RateLimit-Bucket"]
    assert answers[3][:2] == (400, {"message": "Cannot send an empty message", "code": 50006})


async def test_a_channel_over_its_bucket_gets_429_until_the_window_ends_and_others_go_on() -> None:
    """Two sends per 40 s in #general: the third is 429 with retry_after the rest of the window, scope
    user, Via, nothing posted; #random is served meanwhile; once the window is over, #general is too."""
    clock = StepClock()
    async with DiscordEmulator(clock=clock) as emu:
        general, random_id = emu.channels["general"], emu.channels["random"]
        emu.rate_limits.set("send", 2, 40.0, channel_id=general)
        path = f"/channels/{general}/messages"
        assert [(await raw(emu, "POST", path, {"content": "ok"}))[0] for _ in range(2)] == [200, 200]
        clock.now += 10.0
        status, body, headers = await raw(emu, "POST", path, {"content": "over the limit"})
        other = await raw(emu, "POST", f"/channels/{random_id}/messages", {"content": "elsewhere"})
        clock.now += 30.0
        after = await raw(emu, "POST", path, {"content": "next window"})
    assert status == 429
    assert body == {"message": "You are being rate limited.", "retry_after": 30.0, "global": False}
    assert (headers["Retry-After"], headers["X-RateLimit-Scope"]) == ("30", "user")
    assert headers["Via"] == "1.1 google"
    assert (headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset-After"]) == ("0", "30.000")
    assert other[0] == 200 and other[2]["X-RateLimit-Limit"] == "50"
    assert after[0] == 200 and after[2]["X-RateLimit-Remaining"] == "1"
    assert [m.content for m in emu.sent_messages(general)] == ["ok", "ok", "next window"]
    assert [r.rate_limited for r in emu.requests_for("send")] == [None, None, "user", None, None]


async def test_the_global_limit_counts_every_route_and_answers_a_global_429() -> None:
    clock = StepClock()
    async with DiscordEmulator(clock=clock) as emu:
        general = emu.channels["general"]
        emu.rate_limits.set_global(3, 1.0)
        statuses = [(await raw(emu, "GET", f"/channels/{general}"))[0] for _ in range(2)]
        statuses.append((await raw(emu, "POST", f"/channels/{general}/typing"))[0])
        status, body, headers = await raw(emu, "POST", f"/channels/{general}/messages", {"content": "x"})
        clock.now += 1.0
        later = await raw(emu, "POST", f"/channels/{general}/messages", {"content": "x"})
    assert statuses == [200, 200, 204]
    assert (status, body["global"], body["retry_after"]) == (429, True, 1.0)
    assert (headers["X-RateLimit-Global"], headers["X-RateLimit-Scope"]) == ("true", "global")
    assert later[0] == 200
    assert [r.rate_limited for r in emu.requests if r.rate_limited] == ["global"]


async def test_discord_py_waits_out_a_short_bucket_it_learned_from_the_headers(emu: DiscordEmulator) -> None:
    """Two sends per 0.3 s: discord.py reads the headers and holds the third send until the window
    ends, so Discord never has to answer 429."""
    general = emu.channels["general"]
    emu.rate_limits.set("send", 2, 0.3)
    async with running(emu) as run:
        channel = run.bot.get_channel(general)
        assert isinstance(channel, discord.TextChannel)
        for n in range(4):
            await channel.send(f"message {n}")
    sends = emu.requests_for("send")
    assert [r.status for r in sends] == [200] * 4
    assert sends[2].time - sends[0].time >= 0.3 - 0.01


async def test_with_max_ratelimit_timeout_a_long_bucket_raises_rate_limited_without_a_request(
    emu: DiscordEmulator,
) -> None:
    """discord.py with ``max_ratelimit_timeout=30`` (its smallest): once a response has said the
    channel's window lasts 40 s, the next send raises ``RateLimited`` at once, before any request
    (discord.py checks the window, not the count left); a 429 whose retry_after is over 30 s
    raises it too instead of sleeping. Other channels are not held."""
    general, random_id = emu.channels["general"], emu.channels["random"]
    emu.rate_limits.set("send", 5, 40.0, channel_id=general)
    async with running(emu, make_bot(max_ratelimit_timeout=30.0)) as run:
        channel, other = run.bot.get_channel(general), run.bot.get_channel(random_id)
        assert isinstance(channel, discord.TextChannel) and isinstance(other, discord.TextChannel)
        await channel.send("first")
        started = time.monotonic()
        with pytest.raises(discord.RateLimited) as held:
            await channel.send("second")
        await other.send("elsewhere")
        emu.faults.add("429", "send", count=1, retry_after=45.0)
        with pytest.raises(discord.RateLimited) as told:
            await other.send("told to wait 45 s")
        assert time.monotonic() - started < 5.0
    assert 39.0 < held.value.retry_after <= 40.0
    assert told.value.retry_after == 45.0
    assert [r.status for r in emu.requests_for("send")] == [200, 200, 429]
