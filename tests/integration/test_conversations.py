"""Conversations that follow threads, forum posts and reply chains, and tell people apart; auto-threads.
Real discord.py and google-genai against the emulators.

The emulated Gemini echoes how many earlier turns it received ("saw N earlier turns"), which is how
these tests see which history a question was sent with. ``admin`` is Alice and ``normal`` is Bob;
``manager`` has Manage Server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import marks
from bot.conversations import NO_THREAD_PERMISSION
from sandbox.discord_emu import ChannelRef, SentMessage
from sandbox.discord_state import CREATE_PUBLIC_THREADS, MANAGE_GUILD
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        world.add_text_channel("python")
        world.add_forum_channel("help")
        closed = world.add_text_channel("no-threads")
        world.set_overwrite(closed, world.bot_role_id, deny=CREATE_PUBLIC_THREADS)
        async with live_bot(emus, tmp_path / "data") as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


def label(live: Live, user: str) -> str:
    return f"{live.discord.world.user(user).username.title()} (<@{live.discord.users[user]}>)"


async def answer(live: Live, msg: dict[str, Any]) -> SentMessage:
    cid = int(msg["channel_id"])
    [reply] = await live.wait_replies(msg["id"], channel=cid)
    return reply


def last_contents(live: Live) -> list[dict[str, Any]]:
    [*_, request] = [r for r in live.gemini.requests if r.action == "generateContent"]
    return list(request.body["contents"])


async def test_a_reply_to_an_earlier_answer_continues_that_branch_not_the_channel(live: Live) -> None:
    q1 = await live.say("remember banana", author="admin")
    a1 = await answer(live, q1)
    assert "saw 0 earlier turns" in a1.content
    for word in ("apple", "cherry"):
        await answer(live, await live.say(f"remember {word}"))

    # Alice replies to the first answer: she continues from it, not from the channel's latest turns.
    q4 = await live.say("what did I ask?", author="admin", mention=False, reference_message_id=a1.id)
    a4 = await answer(live, q4)
    assert "saw 2 earlier turns" in a4.content
    sent = [part["text"] for content in last_contents(live) for part in content["parts"]]
    assert sent[0] == f"{label(live, 'admin')}: remember banana" and "apple" not in " ".join(sent)
    # A reply to the branch's answer goes on in the branch.
    a5 = await answer(live, await live.say("and then?", mention=False, reference_message_id=a4.id))
    assert "saw 4 earlier turns" in a5.content
    # The channel's own conversation is untouched by the branch: a mention continues it.
    a6 = await answer(live, await live.say("next please"))
    assert "saw 6 earlier turns" in a6.content
    # A reply to the channel's latest answer simply continues the channel.
    a7 = await answer(live, await live.say("go on", mention=False, reference_message_id=a6.id))
    assert "saw 8 earlier turns" in a7.content
    keys = {str(row[0]) for row in await _keys(live)}
    assert keys == {str(live.general), f"{live.general}:{q4['id']}"}

    # /reset forgets the channel's conversation and its branches.
    done = await run(live, "reset", {"confirm": True}, user="admin")
    # 10 turns of the channel, 6 of the branch (the 2 it started with, then its own 4).
    assert only_text(done) == "Done: I forgot this conversation (16 messages). We start afresh."
    a8 = await answer(live, await live.say("still there?", mention=False, reference_message_id=a4.id))
    assert "saw 0 earlier turns" in a8.content


async def _keys(live: Live) -> list[tuple[Any, ...]]:
    db = live.app.storage

    async def body(conn: Any) -> list[tuple[Any, ...]]:
        cur = await conn.execute("SELECT DISTINCT conversation_key FROM turns")
        return list(await cur.fetchall())

    return await db._run("test", body, write=False)


async def test_each_turn_carries_who_said_it_so_gemini_tells_people_apart(live: Live) -> None:
    await answer(live, await live.say("my favourite colour is green", author="admin"))
    await answer(live, await live.say("my favourite colour is red"))
    reply = await answer(live, await live.say("who said green"))
    assert marks.strip(reply.content) == f"{label(live, 'admin')} said «my favourite colour is green»."
    texts = [content["parts"][0]["text"] for content in last_contents(live) if content["role"] == "user"]
    assert texts == [
        f"{label(live, 'admin')}: my favourite colour is green",
        f"{label(live, 'normal')}: my favourite colour is red",
        f"{label(live, 'normal')}: who said green",
    ]
    async with asyncio.timeout(5):  # the exchange is stored by the transaction that finishes its item
        while len(history := await live.app.storage.history(str(live.general))) < 6:
            await asyncio.sleep(0.01)
    speakers = [label(live, "admin"), label(live, "normal"), label(live, "normal")]
    assert [t.speaker for t in history if t.role == "user"] == speakers

    # A DM has one person in it: sent as it is.
    dm = live.discord.dm_channel("normal")
    await answer(live, await live.say("hello", channel=dm, mention=False))
    assert last_contents(live)[-1]["parts"] == [{"text": "hello"}]


async def test_a_forum_post_is_a_conversation_of_its_own_and_a_chat_forum_needs_no_mention(
    live: Live,
) -> None:
    forum = live.discord.channels["help"]
    first = await live.discord.create_forum_post(
        forum, title="Bananas", content="remember banana", mentions_bot=True
    )
    post = int(first["channel_id"])
    assert post == int(first["id"])  # a forum post's thread has its first message's id
    assert "saw 0 earlier turns" in (await answer(live, first)).content
    other = await live.discord.create_forum_post(
        forum, "admin", "Apples", "remember apple", mentions_bot=True
    )
    assert "saw 0 earlier turns" in (await answer(live, other)).content  # not the first post's history
    again = await live.say("what did I say", channel=post)
    assert "saw 2 earlier turns" in (await answer(live, again)).content

    turned = await run(
        live,
        "settings",
        {"set": {"setting": "chat", "value": "on", "where": ChannelRef(forum)}},
        user="manager",
    )
    assert only_text(turned) == f"Chat channel is now on in <#{forum}>."
    plain = await live.say("no mention needed here", channel=post, mention=False)
    assert "saw 4 earlier turns" in (await answer(live, plain)).content
    elsewhere = await live.say("just chatting", channel=live.discord.channels["python"], mention=False)
    probe = await live.say("hello", channel=live.discord.channels["python"])
    await answer(live, probe)
    assert live.replies_to(elsewhere["id"], live.discord.channels["python"]) == []


async def test_auto_thread_answers_a_mention_in_a_new_thread_named_from_the_question(live: Live) -> None:
    python = live.discord.channels["python"]
    turned = await run(
        live,
        "settings",
        {"set": {"setting": "auto_thread", "value": "on", "where": ChannelRef(python)}},
        user="manager",
    )
    assert only_text(turned) == f"Auto-thread is now on in <#{python}>."
    question = await live.say("How do I **reverse** a list in <#1234>?", channel=python, author="admin")
    thread = int(question["id"])  # a thread started from a message has the message's id
    [reply] = await live.discord.wait_for_bot_message(thread)
    data = live.discord.world.channel_data[thread]
    assert data["name"] == "How do I reverse a list in #channel?" and data["parent_id"] == str(python)
    assert "How do I **reverse**" in reply.content and reply.pings == {f"user:{live.discord.users['admin']}"}
    assert live.sent(python) == []  # nothing in the channel itself
    follow = await live.say("and a tuple?", channel=thread, author="admin")
    assert "saw 2 earlier turns" in (await answer(live, follow)).content
    assert live.discord.world.channel_data.get(int(follow["id"])) is None  # no thread from inside a thread

    # Discord refuses the thread (the permission was taken away since): one sentence, answered here.
    live.discord.world.set_overwrite(python, live.discord.world.bot_role_id, deny=CREATE_PUBLIC_THREADS)
    refused = await live.say("and a dict?", channel=python)
    replies = await live.wait_replies(refused["id"], 2, channel=python)
    assert marks.strip(replies[0].content) == NO_THREAD_PERMISSION
    assert "and a dict?" in replies[1].content


async def test_auto_thread_without_the_permission_says_so_without_asking_discord(live: Live) -> None:
    closed = live.discord.channels["no-threads"]
    await run(
        live,
        "settings",
        {"set": {"setting": "auto_thread", "value": "on", "where": ChannelRef(closed)}},
        user="manager",
    )
    before = len(live.discord.requests_for("thread"))
    asked = await live.say("a question", channel=closed)
    notice, reply = await live.wait_replies(asked["id"], 2, channel=closed)
    assert notice.content == NO_THREAD_PERMISSION and "a question" in reply.content
    assert len(live.discord.requests_for("thread")) == before  # decided from discord.py's cache


async def test_a_thread_opened_before_for_the_same_message_is_used_again(live: Live) -> None:
    """A process that opened the thread and died before accepting the message: Discord delivers the
    message again, refuses a second thread (400 160004), and the answer goes to the first one."""
    python = live.discord.channels["python"]
    posted = await live.say("asked once", channel=python, mention=False)
    live.discord.world.add_thread(python, "asked once", owner="bot", thread_id=int(posted["id"]))
    channel = live.bot.get_channel(python)
    assert channel is not None
    message = await channel.fetch_message(int(posted["id"]))  # type: ignore[union-attr]
    thread, missing = await live.bot.intake.conversations.open_thread(message, "asked once")
    assert thread is not None and thread.id == int(posted["id"]) and not missing
    assert [r.status for r in live.discord.requests_for("thread")] == [400]
