"""The terminal chat drives both emulators: typed lines, slash commands, identities, faults.

No bot runs here: a raw gateway client stands in where a test needs to see a dispatch, and
raw REST calls with the bot token stand in for the bot's replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from google import genai
from google.genai import errors, types

from sandbox import responder
from sandbox.__main__ import SANDBOX_DISCORD_TOKEN, bot_settings, open_emulators, run
from sandbox.console import CommandError, Console, parse_duration, parse_fault, parse_slash, render_message
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import FAULT_KINDS, GeminiEmulator
from services.config import load_config


async def scripted(lines: Iterable[str]) -> AsyncIterator[str]:
    """An async line source that yields ``lines`` and then ends, like stdin at EOF."""
    for line in lines:
        yield line


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[DiscordEmulator, GeminiEmulator]]:
    """Both emulators started on loopback ports, stopped after the test."""
    async with DiscordEmulator() as discord, GeminiEmulator() as gemini:
        yield discord, gemini


def make_console(emulators: tuple[DiscordEmulator, GeminiEmulator], lines: Iterable[str] = ()) -> Console:
    discord, gemini = emulators
    return Console(discord, gemini, scripted(lines), io.StringIO(), poll_interval=0.01)


def output(console: Console) -> str:
    assert isinstance(console.out, io.StringIO)
    return console.out.getvalue()


async def bot_rest(discord: DiscordEmulator, method: str, path: str, body: dict[str, Any] | None = None,
                   ) -> Any:
    """Call the Discord emulator's REST API as the bot would (bot token)."""
    headers = {"Authorization": f"Bot {discord.token}"}
    async with aiohttp.ClientSession() as s, s.request(
            method, discord.api_base + path, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith(("{", "[")) else text)


# parsing


def test_parse_fault_reads_count_duration_probability_target_and_params():
    kinds = {"503", "429", "close"}
    expected = {"kind": "503", "target": "*", "params": {}, "duration": 30.0}
    assert parse_fault(["503", "30s"], kinds) == expected
    assert parse_fault(["429", "next", "3"], kinds)["count"] == 3
    spec = parse_fault(["send", "503", "p=0.25", "retry_delay=5s"], kinds)
    assert (spec["target"], spec["probability"], spec["params"]) == ("send", 0.25, {"retry_delay": "5s"})
    assert parse_fault(["gateway", "close", "4000"], kinds)["params"] == {"code": 4000}
    with pytest.raises(CommandError):
        parse_fault(["nonsense"], kinds)
    assert parse_fault(["429", "gemini-x", "next", "3"], kinds)["target"] == "gemini-x"
    with pytest.raises(CommandError):
        parse_fault(["503", "gemini-x", "soon"], kinds)


def test_parse_duration_units():
    assert parse_duration("30s") == 30.0
    assert parse_duration("2m") == 120.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("next") is None


def test_parse_slash_free_text_goes_to_the_named_option_and_groups_take_a_subcommand():
    positional = {"ask": "question"}
    assert parse_slash("/ask what is up?", groups={"admin"}, positional=positional) == (
        "ask", {"question": "what is up?"})
    assert parse_slash('/ask "quoted text" private=true', groups=set(), positional=positional) == (
        "ask", {"question": "quoted text", "private": True})
    assert parse_slash("/admin status", groups={"admin"}, positional=positional) == ("admin", {"status": {}})
    assert parse_slash("/admin queue limit=5", groups={"admin"}, positional=positional) == (
        "admin", {"queue": {"limit": 5}})
    with pytest.raises(CommandError):
        parse_slash("/admin", groups={"admin"}, positional=positional)


def test_render_message_shows_reply_embeds_and_ephemeral_marks():
    text = render_message({
        "content": "hi", "message_reference": {"message_id": "1"}, "flags": 64,
        "embeds": [{"title": "Queued", "description": "line one\nline two",
                    "fields": [{"name": "position", "value": "3"}], "footer": {"text": "trace abc"}}],
    }, "#general")
    assert text.splitlines() == [
        "[#general] bot (reply) (only you can see this): hi",
        "  | Queued", "  | line one", "  | line two", "  | position: 3", "  | -- trace abc",
    ]


# typed lines -> the Discord emulator


async def test_a_typed_line_becomes_a_dispatched_message_create_mentioning_the_bot(emulators):
    discord, _ = emulators
    async with aiohttp.ClientSession() as session, session.ws_connect(discord.gateway_url) as ws:
        async def next_dispatch(event: str) -> dict[str, Any]:
            for _ in range(20):  # bounded: HELLO, READY, GUILD_CREATE, ...
                msg = json.loads((await asyncio.wait_for(ws.receive(), 2.0)).data)
                if msg.get("t") == event:
                    return msg["d"]
            raise AssertionError(f"no {event}")

        await ws.send_json({"op": 2, "d": {"token": discord.token, "intents": (1 << 15) | (1 << 9) | 1,
                                           "properties": {}}})
        await next_dispatch("GUILD_CREATE")
        console = make_console(emulators)
        await console.handle("hello there")
        event = await next_dispatch("MESSAGE_CREATE")
    assert event["channel_id"] == str(discord.channels["general"])
    assert event["author"]["id"] == str(discord.users["normal"])
    assert event["content"] == f"<@{discord.bot_user_id}> hello there"
    assert [m["id"] for m in event["mentions"]] == [str(discord.bot_user_id)]
    assert discord.history(discord.channels["general"])[-1]["id"] == event["id"]


async def test_user_and_channel_switches_change_author_and_channel(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    for line in (":user admin", ":channel random", "from admin", ":channel thread", "in thread",
                 ":mention off", "no mention"):
        assert await console.handle(line)
    random_msg = discord.history(discord.channels["random"])[-1]
    assert random_msg["author"]["id"] == str(discord.users["admin"])
    assert random_msg["content"].endswith("from admin")
    thread = discord.history(discord.thread_id)
    assert thread[0]["content"].endswith("in thread") and thread[-1]["content"] == "no mention"
    assert thread[-1]["mentions"] == []


async def test_dm_channel_messages_do_not_mention_the_bot(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    await console.handle(":channel dm")
    await console.handle("psst")
    message = discord.history(discord.dm_channel("normal"))[-1]
    assert message["content"] == "psst" and "guild_id" not in message


async def test_unknown_channel_user_and_command_are_reported_not_raised(emulators):
    console = make_console(emulators)
    assert await console.handle(":channel nowhere")
    assert await console.handle(":user mallory")
    assert await console.handle(":frobnicate")
    assert await console.handle(":fault gemini teapot")
    errors = [line for line in output(console).splitlines() if line.startswith("! ")]
    assert len(errors) == 4
    assert console.channel == "general" and console.user == "normal"


async def test_slash_commands_become_interactions_with_the_current_user(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    await console.handle("/ask what is up")
    await console.handle(":user admin")
    await console.handle("/admin status")
    ask, admin = console.interactions
    assert (ask.name, ask.options) == ("ask", {"question": "what is up"})
    assert ask.user_id == discord.users["normal"]
    assert discord.interaction_log(ask.id).payload["data"]["options"][0]["value"] == "what is up"
    assert (admin.name, admin.options, admin.user_id) == ("admin", {"status": {}}, discord.users["admin"])


# faults


async def test_gemini_fault_commands_schedule_faults_the_emulator_applies(emulators):
    _, gemini = emulators
    console = make_console(emulators)
    await console.handle(":fault gemini 503 next 2")
    fault = gemini.faults.active()[0]
    assert (fault.kind, fault.target, fault.count) == ("503", "*", 2)
    await console.handle(":fault gemini 429 gemini-x next 3 retry_delay=9s")
    assert gemini.faults.active()[1].params == {"retry_delay": "9s"}
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(f"{gemini.base_url}/v1beta/models/gemini-2.5-flash:generateContent",
                              json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                              headers={"x-goog-api-key": gemini.api_key}) as resp:
                statuses.append(resp.status)
    assert statuses == [503, 503, 200]


async def test_gemini_timed_fault_lasts_the_given_duration(emulators):
    _, gemini = emulators
    console = make_console(emulators)
    await console.handle(":fault gemini 503 30s")
    fault = gemini.faults.active()[0]
    assert fault.count is None and fault.until is not None
    assert 29.0 < fault.until - gemini.faults._clock() <= 30.0


async def test_discord_fault_command_hits_the_named_route(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    await console.handle(":fault discord send 500 next 3")
    fault = discord.faults.active()[0]
    assert (fault.kind, fault.target, fault.count) == ("500", "send", 3)
    general = discord.channels["general"]
    status, _ = await bot_rest(discord, "POST", f"/channels/{general}/messages", {"content": "x"})
    assert status == 500
    status, _ = await bot_rest(discord, "POST", f"/channels/{general}/typing")
    assert status == 204 or status == 200  # another route is untouched


async def test_faults_lists_and_heal_clears_both_plans(emulators):
    discord, gemini = emulators
    console = make_console(emulators)
    for line in (":fault gemini 503 next 2", ":fault discord send 500 next 3", ":faults"):
        await console.handle(line)
    text = output(console)
    assert "gemini: #1 503 on *, next 2" in text and "discord: #1 500 on send, next 3" in text
    await console.handle(":heal gemini")
    assert gemini.faults.active() == [] and len(discord.faults.active()) == 1
    await console.handle(":heal")
    await console.handle(":faults")
    assert discord.faults.active() == [] and output(console).rstrip().endswith("(no active faults)")


# what the person sees


async def test_bot_messages_and_edits_are_shown_once_each(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    general = discord.channels["general"]
    _, sent = await bot_rest(discord, "POST", f"/channels/{general}/messages", {
        "content": "queued, position 1", "embeds": [{"title": "Gemini is busy"}]})
    assert console.show_new() == 1
    assert console.show_new() == 0
    await bot_rest(discord, "PATCH", f"/channels/{general}/messages/{sent['id']}", {"content": "the answer"})
    assert console.show_new() == 1
    lines = output(console).splitlines()
    assert lines[-4:] == ["[#general] bot: queued, position 1", "  | Gemini is busy",
                          "[#general] bot (edited): the answer", "  | Gemini is busy"]


async def test_interaction_responses_are_shown_with_the_command_label(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    await console.handle("/ask hi")
    record = console.interactions[0]
    base = f"/interactions/{record.id}/{record.token}/callback"
    assert (await bot_rest(discord, "POST", base, {"type": 5, "data": {"flags": 64}}))[0] in (200, 204)
    await bot_rest(discord, "PATCH", f"/webhooks/{discord.application_id}/{record.token}/messages/@original",
                   {"content": "private answer"})
    console.show_new()
    assert output(console).splitlines()[-2:] == [
        "[/ask] bot (only you can see this): (thinking...)", "[/ask] bot: private answer"]


async def test_run_ends_on_quit_and_leaves_no_tasks(emulators):
    before = asyncio.all_tasks()
    console = make_console(emulators, [":help", "hello", ":quit", "never sent"])
    await asyncio.wait_for(console.run(), 2.0)
    discord, _ = emulators
    contents = [m["content"] for m in discord.history(discord.channels["general"])]
    assert contents == [f"<@{discord.bot_user_id}> hello"]
    assert ":fault gemini" in output(console)
    assert asyncio.all_tasks() == before


# python -m sandbox


async def test_sandbox_run_prints_the_bot_settings_and_stops_on_request(tmp_path):
    before = asyncio.all_tasks()
    out = io.StringIO()
    stop = asyncio.Event()
    env_file = tmp_path / "sandbox.env"
    task = asyncio.create_task(run(discord_port=0, gemini_port=0, out=out, stop=stop, env_file=str(env_file)))
    for _ in range(200):  # bounded wait for the banner
        if "GEMINI_BASE_URL" in out.getvalue():
            break
        await asyncio.sleep(0.005)
    text = out.getvalue()
    for key in (f"DISCORD_TOKEN={SANDBOX_DISCORD_TOKEN}", "DISCORD_API_BASE=http://127.0.0.1:",
                "DISCORD_GATEWAY_URL=ws://127.0.0.1:", "GEMINI_API_KEY=sandbox-key",
                "GEMINI_BASE_URL=http://127.0.0.1:"):
        assert key in text
    written = env_file.read_text()
    base = next(line for line in written.splitlines() if line.startswith("GEMINI_BASE_URL="))
    async with aiohttp.ClientSession() as s, s.post(
            base.split("=", 1)[1] + "/v1/models/gemini-2.5-flash:generateContent", json={"contents": []},
            headers={"x-goog-api-key": "sandbox-key"}) as resp:
        assert resp.status == 200
    stop.set()
    await asyncio.wait_for(task, 3.0)
    assert asyncio.all_tasks() == before


async def test_sandbox_chat_mode_ends_when_the_chat_quits():
    out = io.StringIO()
    await asyncio.wait_for(run(discord_port=0, gemini_port=0, chat=True, out=out,
                               lines=scripted([":fault gemini 503 next 1", ":faults", ":quit"])), 3.0)
    assert "gemini: #1 503 on *, next 1" in out.getvalue()


async def test_bot_settings_name_every_variable_the_bot_reads(emulators):
    discord, gemini = emulators
    settings = bot_settings(discord, gemini)
    assert settings["GEMINI_BASE_URL"] == gemini.base_url
    assert settings["DISCORD_API_BASE"] == discord.api_base
    assert settings["DISCORD_GATEWAY_URL"] == discord.gateway_url
    assert set(FAULT_KINDS) >= {"429", "503", "hang"}


async def test_printed_settings_are_accepted_by_the_bots_config():
    """The sandbox token is token-shaped: the bot's config rejects anything else as DISCORD_TOKEN."""
    async with open_emulators() as (discord, gemini):
        config = load_config(bot_settings(discord, gemini), env_file=None)
        assert config.discord_token == SANDBOX_DISCORD_TOKEN
        assert config.discord_api_base == discord.api_base and config.gemini_base_url == gemini.base_url
        assert config.admin_user_ids == {discord.users["admin"]}


# end to end: a real discord.py bot and the real google-genai client behind the console


async def test_console_shows_a_real_bots_gemini_answers_and_injected_faults():
    """A person types; a minimal real bot answers through Gemini; a typed fault changes the answer."""
    async with DiscordEmulator(heartbeat_interval=0.5) as dc, GeminiEmulator() as gm:
        old = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = dc.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(dc.gateway_url)
        gemini = genai.Client(api_key=gm.api_key, http_options=types.HttpOptions(
            base_url=gm.base_url, timeout=2_000, retry_options=types.HttpRetryOptions(attempts=1)))
        intents = discord.Intents.default()
        intents.message_content = True
        bot = discord.Client(intents=intents, guild_ready_timeout=0.05)

        @bot.event
        async def on_message(message: discord.Message) -> None:
            if message.author.bot or bot.user not in message.mentions:
                return
            prompt = message.content.replace(bot.user.mention, "").strip()
            try:
                reply = await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents=prompt)
                answer = reply.text
            except errors.APIError as exc:
                answer = f"Gemini failed: {exc.code}"
            await message.reply(answer or "(no answer)", allowed_mentions=discord.AllowedMentions.none())

        console = make_console((dc, gm))
        general = dc.channels["general"]
        try:
            await bot.login(dc.token)
            connecting = asyncio.create_task(bot.connect())
            await asyncio.wait_for(bot.wait_until_ready(), 5)
            await console.handle("hello")
            await dc.wait_for_bot_message(general, count=1, timeout=5)
            await console.handle(":fault gemini 503 next 1")
            await console.handle("are you there?")
            await dc.wait_for_bot_message(general, count=2, timeout=5)
            console.show_new()
        finally:
            await bot.close()
            await asyncio.wait_for(connecting, 5)
            await gemini.aio.aclose()
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old
    shown = [line for line in output(console).splitlines() if line.startswith("[#general]")]
    assert shown == [f"[#general] bot (reply): {responder.CANNED['hello']}",
                     "[#general] bot (reply): Gemini failed: 503"]


async def test_stdin_lines_yields_each_line_without_newlines_then_ends():
    from sandbox.console import stdin_lines

    lines = [line async for line in stdin_lines(io.StringIO("hello\n:faults\nlast"))]
    assert lines == ["hello", ":faults", "last"]


async def test_log_shows_recent_requests_with_outcomes(emulators):
    discord, gemini = emulators
    console = make_console(emulators)
    await console.handle(":fault gemini 503 next 1")
    async with aiohttp.ClientSession() as s, s.post(
            f"{gemini.base_url}/v1/models/gemini-2.5-pro:generateContent", json={"contents": []},
            headers={"x-goog-api-key": gemini.api_key}) as resp:
        assert resp.status == 503
    await bot_rest(discord, "POST", f"/channels/{discord.channels['general']}/typing")
    await console.handle(":log 1")
    lines = output(console).splitlines()[-2:]
    assert lines[0] == "  gemini  POST gemini-2.5-pro:generateContent -> fault:503"
    assert lines[1].startswith("  discord POST typing -> 20")


async def test_unanswered_counts_messages_to_the_bot_until_it_replies_to_each(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    general = discord.channels["general"]
    await console.handle("first question")
    await console.handle(":mention off")
    await console.handle("not for the bot")  # no mention in a guild channel: no reply expected
    await console.handle(":channel dm")
    await console.handle("a DM")  # a DM is always for the bot
    assert console.unanswered() == 2
    first = discord.history(general)[0]
    await bot_rest(discord, "POST", f"/channels/{general}/messages", {
        "content": "an answer", "message_reference": {"message_id": first["id"]}})
    await bot_rest(discord, "POST", f"/channels/{general}/messages", {"content": "not a reply"})
    assert console.unanswered() == 1


async def test_wait_answered_prints_the_reply_and_returns_when_all_are_answered(emulators):
    discord, _ = emulators
    console = make_console(emulators)
    general = discord.channels["general"]
    await console.handle("question")
    question = discord.history(general)[0]

    async def reply_later() -> None:
        await asyncio.sleep(0.03)
        await bot_rest(discord, "POST", f"/channels/{general}/messages", {
            "content": "late but here", "message_reference": {"message_id": question["id"]}})

    replier = asyncio.create_task(reply_later())
    assert await console.wait_answered(2.0) == 0
    await replier
    assert output(console).rstrip().endswith("[#general] bot (reply): late but here")


async def test_wait_answered_is_bounded_by_its_timeout_and_by_give_up(emulators):
    console = make_console(emulators)
    await console.handle("nobody answers this")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await console.wait_answered(0.05) == 1
    assert await console.wait_answered(5.0, give_up=lambda: True) == 1
    assert loop.time() - started < 1.0


def test_stdin_pump_ends_quietly_when_the_loop_is_gone():
    """A line read after the chat's loop closed must not print a thread traceback."""
    import threading

    from sandbox.console import stdin_lines

    read_line = threading.Event()
    release = threading.Event()
    errors_seen: list[BaseException] = []

    class SlowStdin(io.StringIO):
        def readline(self, *args: Any) -> str:
            read_line.set()
            release.wait(2.0)
            return "typed after the end\n"

    previous_hook = threading.excepthook
    threading.excepthook = lambda exc: errors_seen.append(exc.exc_value)
    try:
        loop = asyncio.new_event_loop()

        async def start_pump() -> None:
            lines = stdin_lines(SlowStdin())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lines.__anext__(), 0.01)
            await lines.aclose()

        loop.run_until_complete(start_pump())
        assert read_line.wait(2.0)
        loop.close()
        pumps = [t for t in threading.enumerate() if t.name == "console-stdin"]
        release.set()
        for thread in pumps:
            thread.join(2.0)
    finally:
        threading.excepthook = previous_hook
    assert pumps and errors_seen == []
