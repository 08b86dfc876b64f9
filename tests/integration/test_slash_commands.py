"""Slash commands through the interaction path: real discord.py (``bot.tree``) against the Discord emulator.

The emulator dispatches INTERACTION_CREATE the way Discord does and records the callback
(deferral), the follow-ups and their flags, so each test checks what the user saw.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bot import marks, texts
from bot.answering import Answerer
from bot.app import build_application
from bot.commands import ASK_TOKEN_MARGIN, INTERACTION_TOKEN_SECONDS, SlashCommands
from bot.routing import FailureRouter
from bot.texts import ACK_MARK
from resilience.degradation import ItemKind, ItemState, Mode
from sandbox.discord_emu import InteractionRecord
from sandbox.discord_state import MANAGE_MESSAGES
from sandbox.responder import words_of_length
from services.config import load_config
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """The bot on fresh emulators with its commands registered and synced (globally).

    Members besides ``admin`` (the guild's Administrator) and ``normal``: ``owner`` is on
    ``ADMIN_USER_IDS``; ``dev`` owns the application (``GET /oauth2/applications/@me``); ``mod``
    has a role with Manage Messages. None of these three has the Administrator permission.
    """
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        owner = world.add_member("owner", "carol")
        world.add_member("dev", "dana")
        world.application_owner = "dev"
        world.add_member("mod", "erin", roles=[world.add_role("Moderator", MANAGE_MESSAGES)])
        async with live_bot(emus, tmp_path / "data", ADMIN_USER_IDS=str(owner)) as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


async def run(live: Live, name: str, options: dict[str, Any] | None = None, **kw: Any) -> InteractionRecord:
    """Run a command and wait for its first follow-up (or direct response)."""
    record = await live.discord.send_interaction(name, options, **kw)
    await live.discord.wait_until(lambda: bool(record.followups) or record.callback_type == 4, 10)
    return record


def only_text(record: InteractionRecord) -> str:
    [text] = record.texts()
    return text


# -- /ask --------------------------------------------------------------------------------------


async def test_ask_defers_then_answers_in_a_public_followup_and_remembers_the_turn(live: Live) -> None:
    record = await run(live, "ask", {"prompt": "hello there"})
    assert record.deferred and not record.ephemeral
    assert [kind for kind, _ in record.events] == ["callback", "followup"]
    [answer] = record.followups
    assert "hello there" in answer.content and not answer.ephemeral
    assert answer.pings == set()
    assert [m.id for m in live.sent()] == [answer.id]  # public: in the channel, and nothing else there
    # The turn is stored in the transaction that finishes the item, just after the follow-up.
    async with asyncio.timeout(5):
        while not (history := await live.app.storage.history(str(live.general))):
            await asyncio.sleep(0.01)
    assert [t.role for t in history] == ["user", "model"]


async def test_ask_private_defers_and_answers_ephemerally_outside_the_channel(live: Live) -> None:
    record = await run(live, "ask", {"prompt": "secret question", "private": True})
    assert record.deferred and record.ephemeral
    [answer] = record.followups
    assert answer.ephemeral and "secret question" in answer.content
    assert live.sent() == []
    # Not remembered in the channel's shared history, which feeds everyone's answers.
    async with asyncio.timeout(5):
        while (await live.app.storage.stats(now=live.app.clock.time())).depth.get(
            (ItemKind.INBOUND, ItemState.DONE)
        ) != 1:
            await asyncio.sleep(0.01)
    assert await live.app.storage.history(str(live.general)) == []


async def test_ask_while_gemini_is_down_acknowledges_then_answers_later_in_the_channel(live: Live) -> None:
    # One 429 asking for 0.1 s, and no retries: the item is queued and due again 0.1 s later.
    live.gemini.faults.add("429", count=1, retry_delay="0.1s")
    live.app.gemini_retry.max_attempts = 1  # the queue, not the retry policy, is under test here
    record = await run(live, "ask", {"prompt": "queued question"})
    [ack] = record.followups
    assert ack.content.startswith(ACK_MARK), ack.content

    # The drain answers it then, in the channel.
    await live.discord.wait_until(lambda: any(m.id != ack.id for m in live.sent()), 10)
    [late] = [m for m in live.sent() if m.id != ack.id]
    assert late.content.startswith(f"<@{live.discord.users['normal']}> You asked earlier")
    assert "queued question" in late.content
    assert record.followups == [ack]  # the late answer is a channel message, not a follow-up
    assert late.channel_id == live.general


async def test_a_late_answer_to_ask_mentions_the_user(live: Live) -> None:
    live.gemini.faults.add("429", count=1, retry_delay="0.1s")
    live.app.gemini_retry.max_attempts = 1
    record = await run(live, "ask", {"prompt": "ping me later"})
    [ack] = record.followups
    await live.discord.wait_until(lambda: any(m.id != ack.id for m in live.sent()), 10)
    [late] = [m for m in live.sent() if m.id != ack.id]
    assert late.pings == {f"user:{live.discord.users['normal']}"}


async def test_ask_blocked_by_safety_gets_the_explanation_as_the_followup(live: Live) -> None:
    live.gemini.faults.add("safety", count=1)
    record = await run(live, "ask", {"prompt": "something risky"})
    [answer] = record.followups
    assert "safety" in answer.content and "Traceback" not in answer.content


async def test_ask_in_a_dm_answers_with_the_dm_history(live: Live) -> None:
    dm = live.discord.dm_channel("normal")
    first = await run(live, "ask", {"prompt": "one"}, channel_id=dm)
    assert "one" in first.followups[0].content
    second = await run(live, "ask", {"prompt": "two"}, channel_id=dm)
    assert "two" in second.followups[0].content
    # The first answer finished under the conversation's lock, so the second sees it.
    assert "saw 2 earlier turns" in second.followups[0].content
    assert live.sent(dm) == [first.followups[0], second.followups[0]]


async def test_ask_in_maintenance_saves_the_question_and_says_so(live: Live) -> None:
    live.app.degradation.set(Mode.MAINTENANCE, reason="test", message="Back soon.")
    record = await run(live, "ask", {"prompt": "are you there"})
    text = only_text(record)
    assert "Back soon." in text and text.startswith(ACK_MARK)
    stats = await live.app.storage.stats(now=live.app.clock.time())
    assert stats.pending() == 1


# -- /reset, /status, /help ---------------------------------------------------------------------


async def test_reset_needs_confirmation_then_forgets_the_channel_history(live: Live) -> None:
    first = await live.say("remember the word banana")
    await live.wait_replies(first["id"])
    second = await live.say("what did I say")
    [answer] = await live.wait_replies(second["id"])
    assert "saw 2 earlier turns" in answer.content

    unconfirmed = await run(live, "reset", user="mod")
    assert unconfirmed.ephemeral and "confirm:True" in only_text(unconfirmed)
    assert len(await live.app.storage.history(str(live.general))) == 4

    confirmed = await run(live, "reset", {"confirm": True}, user="mod")
    assert confirmed.ephemeral and "4 messages" in only_text(confirmed)
    third = await live.say("and now?")
    [fresh] = await live.wait_replies(third["id"])
    assert "saw 0 earlier turns" in fresh.content


async def remembered(live: Live, channel: int, turns: int) -> list[Any]:
    """The conversation's stored history once it holds ``turns`` turns (stored just after a reply)."""
    async with asyncio.timeout(5):
        while len(history := await live.app.storage.history(str(channel))) < turns:
            await asyncio.sleep(0.01)
    return history


async def chat_once(live: Live, channel: int, author: str = "normal") -> None:
    """One exchange in ``channel``: two turns in its history."""
    sent = await live.say("remember the word banana", channel=channel, author=author)
    await live.wait_replies(sent["id"], channel=channel)
    await remembered(live, channel, 2)


@pytest.mark.parametrize("where", ["general", "thread"])
async def test_a_member_without_manage_messages_cannot_reset_a_shared_conversation(
    live: Live, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    channel = live.general if where == "general" else live.discord.thread_id
    await chat_once(live, channel)
    record = await run(live, "reset", {"confirm": True}, channel_id=channel, user="normal")
    assert len(await live.app.storage.history(str(channel))) == 2  # kept
    assert record.ephemeral
    [refusal] = record.followups
    assert refusal.ephemeral and refusal.content == texts.reset_refused()
    [line] = [line for line in capsys.readouterr().out.splitlines() if "command.refused" in line]
    assert str(live.discord.users["normal"]) in line and "reset" in line


@pytest.mark.parametrize("user", ["mod", "admin"])
async def test_a_member_with_manage_messages_may_reset_a_shared_conversation(live: Live, user: str) -> None:
    thread = live.discord.thread_id
    await chat_once(live, thread)
    record = await run(live, "reset", {"confirm": True}, channel_id=thread, user=user)
    assert only_text(record).startswith("Done: I forgot this conversation (2 messages)")
    assert await live.app.storage.history(str(thread)) == []


async def test_anyone_may_reset_their_own_dm(live: Live) -> None:
    dm = live.discord.dm_channel("normal")
    await chat_once(live, dm)
    record = await run(live, "reset", {"confirm": True}, channel_id=dm, user="normal")
    assert only_text(record).startswith("Done: I forgot this conversation (2 messages)")
    assert await live.app.storage.history(str(dm)) == []


async def test_status_embed_shows_mode_breakers_queue_and_latency(live: Live) -> None:
    await run(live, "ask", {"prompt": "warm up"})
    live.app.board["gemini"].force_open(60, reason="test outage")
    record = await run(live, "status")
    assert record.ephemeral
    [embed] = record.followups[0].embeds
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Mode"].startswith("normal")
    assert re.match(r"open for \d+ s, next try in \d+ s", fields["Breaker gemini"]), fields
    assert fields["Breaker storage"].startswith("closed for")
    assert "Breaker discord.send" in fields
    assert fields["Queue"].startswith("0 waiting")
    assert re.search(r"requests p50 \d+ ms", fields["Latency"]), fields["Latency"]
    assert re.search(r"Gemini p50 \d+ ms", fields["Latency"]), fields["Latency"]


async def test_help_explains_how_to_talk_to_the_bot(live: Live) -> None:
    record = await run(live, "help")
    text = only_text(record)
    assert record.ephemeral and "/ask" in text and "mention" in text and "queue" in text


async def test_help_says_who_may_use_server_admin_and_reset(live: Live) -> None:
    text = only_text(await run(live, "help"))
    assert "`/server` for this server only" in text and "Manage Server" in text
    assert "**The bot's owners**: `/admin` for what affects every server" in text
    assert "Manage Messages" in text


# -- /ask past the interaction token's lifetime, and private answers that cannot be DMed --------------


async def wait_item_state(live: Live, state: ItemState) -> None:
    """Wait until the /ask's queue item (inbound, or outbound once staged) reaches ``state``."""
    async with asyncio.timeout(10):
        while True:
            depth = (await live.app.storage.stats(now=live.app.clock.time())).depth
            if depth.get((ItemKind.INBOUND, state), 0) + depth.get((ItemKind.OUTBOUND, state), 0):
                return
            await asyncio.sleep(0.02)


async def test_an_answer_ready_after_the_token_expired_is_posted_in_the_channel_mentioning_the_asker(
    live: Live,
) -> None:
    """Discord refuses follow-ups once the interaction token has expired (401 50027; 15 minutes,
    here 0.5 s). The answer is not lost: it goes to the channel as a message that is no reply,
    mentions the asker (and pings only them) and says what was asked; the turn is remembered."""
    live.discord.interaction_token_lifetime = 0.5
    live.gemini.faults.add("latency", value=1.0, count=1)
    record = await live.discord.send_interaction("ask", {"prompt": "a slow public question"})
    [answer] = await live.discord.wait_for_bot_message(live.general, timeout=10)
    user = live.discord.users["normal"]
    assert answer.content.startswith(f"<@{user}> You asked earlier")
    assert "> a slow public question" in answer.content and "«a slow public question»" in answer.content
    assert answer.message_reference is None and answer.pings == {f"user:{user}"}
    assert record.followups == []
    assert [r.status for r in live.discord.requests_for("followup")] == [401]
    await wait_item_state(live, ItemState.DONE)
    assert [t.role for t in await live.app.storage.history(str(live.general))] == ["user", "model"]


async def test_a_long_answer_after_the_token_expired_keeps_every_chunk_within_discords_limit(
    live: Live,
) -> None:
    """When the first chunk has no room for the mention and the question, they go first, on their
    own; then every chunk of the answer, in order, none over 2,000 characters, nothing lost."""
    live.discord.interaction_token_lifetime = 0.5
    live.gemini.faults.add("latency", value=1.0, count=1)
    await live.discord.send_interaction("ask", {"prompt": "reply with 2500 characters"})
    sent = await live.discord.wait_for_bot_message(live.general, count=3, timeout=10)
    intro, *chunks = sent
    user = live.discord.users["normal"]
    assert intro.content == f"<@{user}> You asked earlier: > reply with 2500 characters"
    assert intro.pings == {f"user:{user}"}
    text = " ".join(marks.strip(c.content) for c in chunks)  # without the answers' invisible marks
    assert text.split() == words_of_length(2500).split()
    assert all(len(m.content) <= 2000 and m.message_reference is None for m in sent)
    await wait_item_state(live, ItemState.DONE)
    assert len(live.sent()) == 3


async def test_a_private_answer_ready_after_the_token_expired_is_sent_by_dm(live: Live) -> None:
    live.discord.interaction_token_lifetime = 0.5
    live.gemini.faults.add("latency", value=1.0, count=1)
    await live.discord.send_interaction("ask", {"prompt": "a slow secret", "private": True})
    dm = live.discord.dm_channel("normal")
    [answer] = await live.discord.wait_for_bot_message(dm, timeout=10)
    assert "> a slow secret" in answer.content and "«a slow secret»" in answer.content
    assert live.sent() == []
    await wait_item_state(live, ItemState.DONE)
    assert await live.app.storage.history(str(live.general)) == []


async def test_a_private_answer_the_user_does_not_accept_by_dm_is_dead_lettered_with_a_notice(
    live: Live,
) -> None:
    """The token expired and the asker accepts no DMs (403 50007): the answer cannot reach them
    anywhere private. It is dead-lettered with a log line saying why, and since the question came
    from a server channel, a short notice there tells the asker (pinging only them) without the
    question or the answer."""
    live.discord.world.close_dms("normal")
    live.discord.interaction_token_lifetime = 0.5
    live.gemini.faults.add("latency", value=1.0, count=1)
    with capture_logs() as logs:
        await live.discord.send_interaction("ask", {"prompt": "a slow secret", "private": True})
        [notice] = await live.discord.wait_for_bot_message(live.general, timeout=10)
        await wait_item_state(live, ItemState.DEAD)
    assert_private_answer_refused(live, notice, logs)


async def test_a_late_private_answer_the_user_does_not_accept_by_dm_is_dead_lettered_with_a_notice(
    live: Live,
) -> None:
    """Gemini was down: the private /ask was queued (ephemeral acknowledgement), and the drain's
    late answer goes by DM, which the asker does not accept: the same dead letter and notice."""
    live.discord.world.close_dms("normal")
    live.gemini.faults.add("429", count=1, retry_delay="0.1s")
    live.app.gemini_retry.max_attempts = 1
    with capture_logs() as logs:
        record = await run(live, "ask", {"prompt": "a queued secret", "private": True})
        [ack] = record.followups
        assert ack.ephemeral and ack.content.startswith(ACK_MARK)
        [notice] = await live.discord.wait_for_bot_message(live.general, timeout=10)
        await wait_item_state(live, ItemState.DEAD)
    assert_private_answer_refused(live, notice, logs)


def assert_private_answer_refused(live: Live, notice: Any, logs: list[dict[str, Any]]) -> None:
    user = live.discord.users["normal"]
    assert notice.content == f"<@{user}> {texts.private_answer_undeliverable()}"
    assert "secret" not in notice.content and notice.pings == {f"user:{user}"}
    assert live.discord.sent_messages(live.discord.dm_channel("normal")) == []
    [line] = [e for e in logs if e["event"] == "pipeline.undeliverable"]
    assert (line["reason"], line["user_id"], line["private"]) == ("dm_closed", user, True)
    assert live.app.board["discord.send"].state.value == "closed"


async def test_ask_never_runs_past_the_interaction_tokens_lifetime(tmp_path: Path) -> None:
    """However long the processing timeout is set, /ask stops a minute before Discord's 15-minute
    token lifetime, so its "took too long" sentence can still be shown."""
    longest = {"PROCESSING_TIMEOUT_SECONDS": "3600", "MUTEX_ACQUIRE_TIMEOUT_SECONDS": "300"}
    config = load_config(environ={**longest, "DATA_DIR": str(tmp_path / "data")}, env_file=None)
    app = build_application(config)
    router = FailureRouter(app)
    commands = SlashCommands(app, Answerer(app, router), router)
    assert commands.ask_timeout == INTERACTION_TOKEN_SECONDS - ASK_TOKEN_MARGIN == 840.0


# -- errors ----------------------------------------------------------------------------------------


async def test_a_command_that_times_out_gets_one_ephemeral_sentence(live: Live) -> None:
    live.bot.install_commands(timeout=0.2)
    # An answer in progress holds the conversation: /reset waits for it, past its timeout.
    async with live.app.mutex.acquire(str(live.general), 1.0, holder="test"):
        record = await run(live, "reset", {"confirm": True}, user="mod")
    assert record.ephemeral
    [sentence] = record.followups
    assert sentence.ephemeral
    assert sentence.content == "That took too long, so I stopped. Please try again in a moment."


async def test_a_public_ask_that_times_out_replaces_the_thinking_message_with_an_ephemeral_sentence(
    live: Live,
) -> None:
    commands = live.bot.install_commands()
    commands.ask_timeout = 0.2
    live.gemini.faults.add("latency", value=1.0, count=1)
    record = await run(live, "ask", {"prompt": "slow one"})
    assert record.deferred and not record.ephemeral
    assert [kind for kind, _ in record.events] == ["callback", "delete", "followup"]
    [sentence] = record.followups
    assert sentence.ephemeral and "took too long" in sentence.content
    assert live.sent() == []


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("no-such-command", {}),  # CommandNotFound: Discord knows a command this process does not
        ("admin", {"circuit": {"bogus": {}}}),  # CommandNotFound for a subcommand
        ("ask", {}),  # CommandSignatureMismatch: a required option missing (an older signature)
        ("admin", {}),  # CommandSignatureMismatch: a group invoked without a subcommand
    ],
)
async def test_unknown_or_out_of_sync_commands_are_answered_ephemerally_not_ignored(
    live: Live, name: str, options: dict[str, Any]
) -> None:
    record = await run(live, name, options, user="admin")
    assert record.callback_type == 4 and record.ephemeral
    assert only_text(record).startswith("I don't know that command in this form")
    assert live.sent() == []


# -- /admin: the bot's owners only ------------------------------------------------------------------


async def test_admin_and_server_groups_carry_their_default_permissions_in_the_synced_json(live: Live) -> None:
    """UI metadata only (each invocation is checked at runtime): Administrator, Manage Server."""
    synced = {c["name"]: c for c in live.discord.commands[None]}
    assert str(synced["admin"]["default_member_permissions"]) == "8"  # Administrator
    assert str(synced["server"]["default_member_permissions"]) == "32"  # Manage Server
    assert synced["server"]["contexts"] == [0] and synced["server"]["dm_permission"] is False  # guilds only
    assert str(synced["settings"]["default_member_permissions"]) == "32"  # Manage Server
    user_commands = [c for name, c in synced.items() if name not in ("admin", "server", "settings")]
    names = {c["name"] for c in user_commands}
    assert names == {"ask", "reset", "status", "help", "usage", "model", "memory"}
    assert all(c.get("default_member_permissions") is None for c in user_commands)


EVERY_ADMIN_COMMAND = [
    {"circuit": {"status": {}}},
    {"circuit": {"reset": {"name": "all"}}},
    {"circuit": {"open": {"name": "gemini"}}},
    {"maintenance": {"on": {}}},
    {"maintenance": {"off": {}}},
    {"maintenance": {"status": {}}},
    {"queue": {"status": {}}},
    {"queue": {"drain": {}}},
    {"queue": {"purge": {"state": "dead"}}},
    {"datastore": {"validate": {}}},
    {"datastore": {"recover": {"name": "admins"}}},
    {"mutex": {"status": {}}},
    {"mutex": {"release": {"key": "1"}}},
    {"usage": {}},
]


def command_id(options: dict[str, Any]) -> str:
    return " ".join([*options, *next(iter(options.values()))])


@pytest.mark.parametrize("user", ["admin", "normal"])
@pytest.mark.parametrize("options", EVERY_ADMIN_COMMAND, ids=command_id)
async def test_a_guild_administrator_or_member_is_refused_every_bot_wide_command(
    live: Live, options: dict[str, Any], user: str
) -> None:
    """A server's Administrator controls that server, not the bot every server shares."""
    key = str(live.discord.channels["random"])
    async with live.app.mutex.acquire(key, 1.0, holder="stuck"):
        if "mutex" in options and "release" in options["mutex"]:
            options = {"mutex": {"release": {"key": key}}}
        record = await run(live, "admin", options, user=user)
        assert live.app.mutex.locked(key)
    assert record.ephemeral
    [refusal] = record.followups
    assert refusal.ephemeral and refusal.content == texts.owners_only()
    assert "for the bot's owners only" in refusal.content
    assert live.app.maintenance() is None  # nothing happened
    assert all(b.state.value == "closed" for b in live.app.board.snapshot())


@pytest.mark.parametrize("user", ["owner", "dev", "stored"])
async def test_the_bots_owners_may_run_bot_wide_commands(live: Live, user: str) -> None:
    """Owners: ``ADMIN_USER_IDS`` (owner), the application's owner from Discord (dev), the ``admins`` file."""
    if user == "stored":
        stored = live.discord.world.add_member("stored", "frank")
        await live.app.datastore.save("admins", {"user_ids": [stored]})
    opened = await run(live, "admin", {"circuit": {"open": {"name": "gemini", "reason": "drill"}}}, user=user)
    assert "`gemini` is open until reset (drill)" in only_text(opened)
    assert live.app.board["gemini"].state == "open"
    reset = await run(live, "admin", {"circuit": {"reset": {"name": "all"}}}, user=user)
    assert "`gemini`" in only_text(reset) and live.app.board["gemini"].state == "closed"


async def test_an_owner_may_run_bot_wide_commands_in_a_dm(live: Live) -> None:
    dm = live.discord.dm_channel("dev")
    on = {"maintenance": {"on": {"message": "Back soon."}}}
    record = await run(live, "admin", on, user="dev", channel_id=dm)
    assert only_text(record).startswith("Maintenance mode is on")
    assert live.app.maintenance() == "Back soon."


async def test_the_owner_admins_and_developers_of_the_owning_team_are_the_bots_owners(tmp_path: Path) -> None:
    """A team-owned application: its ``owner`` is a stand-in for the team, so the team decides;
    read-only members and members still invited are no owners."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        for key, name in (("lead", "lena"), ("builder", "ben"), ("reader", "rita"), ("invitee", "ivan")):
            world.add_member(key, name)
        team = world.set_team(
            "Crew", {"lead": "admin", "builder": "developer", "reader": "read_only", "invitee?": "admin"}
        )
        async with live_bot(emus, tmp_path / "data", ADMIN_USER_IDS="") as live:
            live.bot.install_commands()
            await live.bot.tree.sync()
            ids = live.discord.users
            assert live.bot.application_owners == {ids["lead"], ids["builder"]} and team not in ids.values()
            assert len(emus.discord.requests_for("application")) == 1  # the one login made
            for user, owner in [("lead", True), ("builder", True), ("reader", False), ("invitee", False)]:
                record = await run(live, "admin", {"circuit": {"status": {}}}, user=user)
                assert (only_text(record) == texts.owners_only()) is not owner, user


async def test_admin_refusals_are_logged_with_the_user(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    await run(live, "admin", {"maintenance": {"on": {}}}, user="admin")
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "command.refused" in line]
    assert str(live.discord.users["admin"]) in line and "maintenance on" in line and "owner" in line
    assert live.app.maintenance() is None  # and nothing happened


async def test_admin_circuit_open_reset_and_unknown_name(live: Live) -> None:
    drill = {"circuit": {"open": {"name": "gemini", "reason": "drill"}}}
    opened = await run(live, "admin", drill, user="owner")
    assert "`gemini` is open until reset (drill)" in only_text(opened)
    assert live.app.board["gemini"].state == "open"

    status = await run(live, "admin", {"circuit": {"status": {}}}, user="owner")
    assert re.search(r"`gemini`: open for \d+ s.*\(drill\)", only_text(status)), only_text(status)

    unknown = await run(live, "admin", {"circuit": {"reset": {"name": "gemni"}}}, user="owner")
    assert unknown.followups[0].ephemeral
    text = only_text(unknown)
    assert text.startswith("Unknown breaker 'gemni'; valid: ") and "gemini" in text

    reset = await run(live, "admin", {"circuit": {"reset": {"name": "all"}}}, user="owner")
    assert "`gemini`" in only_text(reset) and live.app.board["gemini"].state == "closed"


async def test_admin_maintenance_on_changes_what_users_see_and_off_restores_answers(live: Live) -> None:
    on = await run(live, "admin", {"maintenance": {"on": {"message": "Upgrading, back at 3."}}}, user="owner")
    assert "Upgrading, back at 3." in only_text(on)
    asked = await run(live, "ask", {"prompt": "hello?"})
    assert "Upgrading, back at 3." in only_text(asked)

    status = await run(live, "admin", {"maintenance": {"status": {}}}, user="owner")
    assert only_text(status).startswith("Maintenance mode is on")
    off = await run(live, "admin", {"maintenance": {"off": {}}}, user="owner")
    assert only_text(off).startswith("Maintenance mode is off")
    # The saved question is answered in the channel once maintenance is over.
    await live.discord.wait_until(lambda: any("hello?" in m.content for m in live.sent()), 10)


async def test_admin_queue_datastore_and_mutex_commands(live: Live) -> None:
    live.app.board["gemini"].force_open(60, reason="outage")
    await run(live, "ask", {"prompt": "waiting"})
    status = await run(live, "admin", {"queue": {"status": {}}}, user="owner")
    assert only_text(status).startswith("1 waiting"), only_text(status)
    drain = await run(live, "admin", {"queue": {"drain": {}}}, user="owner")
    assert "Held back by open breakers: gemini" in only_text(drain)
    purge = await run(live, "admin", {"queue": {"purge": {"state": "dead"}}}, user="owner")
    assert only_text(purge) == "Deleted 0 dead items."

    validate = await run(live, "admin", {"datastore": {"validate": {}}}, user="owner")
    assert "`maintenance`: ok" in only_text(validate)
    recover = await run(live, "admin", {"datastore": {"recover": {"name": "nope"}}}, user="owner")
    assert only_text(recover).startswith("Unknown datastore file 'nope'")

    key = str(live.discord.channels["random"])
    async with live.app.mutex.acquire(key, 1.0, holder="stuck"):
        held = await run(live, "admin", {"mutex": {"status": {}}}, user="owner")
        assert f"`{key}` held by stuck" in only_text(held)
        released = await run(live, "admin", {"mutex": {"release": {"key": key}}}, user="owner")
        assert only_text(released).startswith(f"Released `{key}`")
    assert not live.app.mutex.locked(key)
