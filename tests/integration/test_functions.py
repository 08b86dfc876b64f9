"""Functions Gemini calls (bot/tools.py), end to end: the real discord.py and google-genai against the
emulators, the loop run by the bot between Gemini's rounds.

The emulated Gemini calls functions on "use tools: a, b, c" (one per round), "use tools forever: a"
(every round) and checks that each round sends one function response per call (sandbox/functions.py).
The first guild's ``manager`` has Manage Server; ``normal`` has no permission to manage anything.
Nothing waits on a clock: every wait is for an emulator event, bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import marks, tools
from bot.texts import ACK_MARK
from sandbox import functions as emulated
from sandbox.discord_state import MANAGE_GUILD
from services.tools import FunctionCall, Safety, Tool
from tests.integration.harness import Emulators, running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run


@pytest.fixture
async def emus() -> AsyncIterator[Emulators]:
    async with running_emulators(heartbeat_interval=1.0) as emulators:
        world = emulators.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        yield emulators


@pytest.fixture
async def live(emus: Emulators, tmp_path: Path) -> AsyncIterator[Live]:
    async with live_bot(emus, tmp_path / "data", TOOLS_MAX_ROUNDS="3") as bot:
        bot.bot.install_commands()
        await bot.bot.tree.sync()
        yield bot


async def functions_on(live: Live, value: str) -> None:
    """A manager turns functions on for the whole server with ``/settings set functions <value>``."""
    done = await run(live, "settings", {"set": {"setting": "functions", "value": value}}, user="manager")
    assert "Functions" in only_text(done), only_text(done)


def generations(live: Live) -> list[dict[str, Any]]:
    return [r.body for r in live.gemini.requests if r.action in ("generateContent", "streamGenerateContent")]


def offered(body: dict[str, Any]) -> list[str]:
    return sorted(emulated.declared(body))


async def answer(live: Live, text: str, *, author: str = "normal") -> tuple[dict[str, Any], str]:
    asked = await live.say(text, author=author)
    [reply] = await live.wait_replies(asked["id"], timeout=15)
    return asked, marks.strip(reply.content)


async def test_a_tool_loop_of_three_calls_is_answered_in_one_reply(live: Live) -> None:
    await functions_on(live, "read")
    asked, text = await answer(live, "use tools: current_time, list_channels, list_roles")
    assert text.startswith("I called 3 function(s):\n- current_time: {")
    assert '- list_channels: [{"id": ' in text and '"name": "general"' in text
    assert '- list_roles: [{"id": ' in text and '"name": "Manager"' in text
    rounds = generations(live)
    assert len(rounds) == 4 and all(emulated.turn_problem(body) is None for body in rounds)
    assert offered(rounds[0]) == ["current_time", "list_channels", "list_roles", "member_profile",
                                  "recent_messages"]
    assert len(live.replies_to(asked["id"])) == 1  # one reply: no message per round
    # The history keeps the question and the answer, not the rounds in between.
    for _ in range(200):  # the turns are stored in the transaction that finishes the item, after the send
        history = await live.app.storage.history(str(live.general))
        if history:
            break
        await asyncio.sleep(0.05)
    assert [t.role for t in history] == ["user", "model"] and history[-1].text.startswith("I called 3")


async def test_a_hanging_tool_times_out_and_the_answer_still_arrives(live: Live) -> None:
    async def hang(context: Any, args: dict[str, Any]) -> Any:
        await asyncio.Event().wait()  # never set: only the tool's timeout ends it

    # A plugin's tool, through the public API.
    live.app.tools.register(Tool("slow_lookup", "Looks something up, slowly.", hang, timeout=0.5))
    await functions_on(live, "read")
    _, text = await answer(live, "use tools: slow_lookup, current_time")
    assert "- slow_lookup failed: slow_lookup did not answer within 0.5 s" in text
    assert "- current_time: {" in text
    breaker = live.app.board.get("tool:slow_lookup")
    assert breaker.failures == 1


async def test_an_admin_tool_is_never_offered_to_a_non_manager(live: Live) -> None:
    await functions_on(live, "read, admin")
    _, text = await answer(live, 'use tools: delete_messages{"count": 1}, current_time')
    assert offered(generations(live)[0]) == ["current_time", "list_channels", "list_roles", "member_profile",
                                             "recent_messages"]
    assert text.startswith("I called 1 function(s):\n- current_time")  # the model could not call it
    assert not any(m.payload.get("components") for m in live.sent())  # nobody was asked to confirm

    before = len(generations(live))
    await answer(live, "what time is it", author="manager")
    assert "delete_messages" in offered(generations(live)[before])


async def test_admin_tools_named_only_by_the_bots_default_are_not_offered(
    emus: Emulators, tmp_path: Path
) -> None:
    async with live_bot(emus, tmp_path / "data", TOOLS_DEFAULT="read,admin") as live:
        await answer(live, "what time is it", author="manager")
        assert "delete_messages" not in offered(generations(live)[0])
        assert "current_time" in offered(generations(live)[0])


async def test_a_destructive_admin_tool_asks_for_confirmation_by_button(live: Live) -> None:
    await functions_on(live, "read, admin")
    for n in range(3):
        await live.say(f"old message {n}", author="normal", mention=False)
    asked = await live.say('use tools: delete_messages{"count": 2}', author="manager")
    # Two replies to the question: the confirmation (with its buttons), then the answer.
    replies = await live.wait_replies(asked["id"], 2, timeout=15)
    [prompt] = [m for m in replies if m.payload.get("components")]
    [reply] = [m for m in replies if not m.payload.get("components")]
    text = marks.strip(reply.content)
    assert "asked <@" in text and "to confirm delete_messages with a button" in text
    assert prompt.content.startswith(f"<@{asked['author']['id']}>, Gemini wants to run **delete_messages**")
    confirm = f'gembot:tool:ok:{asked["author"]["id"]}:delete_messages:{{"count":2}}'
    world = live.discord.world
    history = world.history(live.general)
    assert sum(1 for m in history if m["content"].startswith("old message")) == 3  # nothing deleted yet

    refused = await live.discord.click_button(live.general, int(prompt.id), confirm, user="normal")
    await live.discord.wait_until(lambda: refused.acknowledged, 10)
    assert refused.ephemeral and "Only the person who asked" in json.dumps(refused.callback_data)

    clicked = await live.discord.click_button(live.general, int(prompt.id), confirm, user="manager")
    await live.discord.wait_until(lambda: clicked.acknowledged, 10)

    def settled() -> bool:
        message = world.find_message(live.general, int(prompt.id))
        return message is not None and str(message["content"]).startswith("Done: delete_messages")

    await live.discord.wait_until(settled, 10)
    left = [m["content"] for m in world.history(live.general) if m["content"].startswith("old message")]
    assert left == ["old message 0"]
    assert not world.find_message(live.general, int(prompt.id))["components"]  # the buttons are gone

    # Cancel on a second proposal: nothing is deleted.
    again = await live.say('use tools: delete_messages{"count": 1}', author="manager")
    replies = await live.wait_replies(again["id"], 2, timeout=15)
    [second] = [m for m in replies if m.payload.get("components")]
    cancel = f'gembot:tool:no:{again["author"]["id"]}:delete_messages:{{"count":1}}'
    cancelled = await live.discord.click_button(live.general, int(second.id), cancel, user="manager")
    await live.discord.wait_until(lambda: cancelled.acknowledged, 10)
    assert cancelled.callback_type == 7  # UPDATE_MESSAGE: the proposal says it was cancelled
    shown = world.find_message(live.general, int(second.id))
    assert shown is not None and shown["content"] == "Cancelled: delete_messages was not run."
    assert [m["content"] for m in world.history(live.general) if m["content"].startswith("old message")] == [
        "old message 0"
    ]


async def test_the_round_cap_holds(live: Live) -> None:
    await functions_on(live, "read")
    _, text = await answer(live, "use tools forever: current_time")
    assert text.startswith("I called 3 function(s) (I was asked to stop calling functions)")
    rounds = generations(live)
    assert len(rounds) == 4  # TOOLS_MAX_ROUNDS=3, then one round that may not call
    assert rounds[-1]["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


async def test_a_write_call_runs_at_most_once_per_question_even_when_asked_again(live: Live) -> None:
    await functions_on(live, "write")
    asked = await live.say("react with a thumbs up", mention=False)
    settings = live.app.effective(live.discord.world.channel_guild(live.general), (live.general,))
    channel = live.bot.get_channel(live.general)
    caller = tools.for_answer(live.app, settings, channel=channel, author_id=int(asked["author"]["id"]),
                              question_id=int(asked["id"]))
    assert caller is not None
    call = FunctionCall("react", {"emoji": "\U0001f44d"})
    assert await caller.call(call) == {"result": {"reacted": "\U0001f44d"}}
    # An answer retried after a crash or an outage gets the same question: the reaction is not redone.
    again = tools.for_answer(live.app, settings, channel=channel, author_id=int(asked["author"]["id"]),
                             question_id=int(asked["id"]))
    assert again is not None
    repeated = await again.call(call)
    assert "already done for this question" in repeated["result"]
    react_requests = [r for r in live.discord.requests if r.route == "react"]
    assert len(react_requests) == 1


async def test_streamed_answers_run_the_loop_too(emus: Emulators, tmp_path: Path) -> None:
    async with live_bot(emus, tmp_path / "data", STREAMING="true") as live:
        live.bot.install_commands()
        await live.bot.tree.sync()
        await functions_on(live, "read")
        asked = await live.say("use tools: current_time, list_roles")

        def final() -> bool:
            found = live.replies_to(asked["id"])
            return bool(found) and "- list_roles: [" in marks.strip(
                live.discord.world.find_message(live.general, int(found[0].id))["content"]
            )

        await live.discord.wait_until(final, 15)
        streamed = [r for r in live.gemini.requests if r.action == "streamGenerateContent"]
        assert len(streamed) == 3


async def test_a_write_done_before_gemini_failed_is_not_done_again_when_the_queued_answer_is_retried(
    live: Live,
) -> None:
    """Gemini fails after a round whose write ran: the question is queued, and when the drain answers
    it the whole loop runs again, but the write is not done a second time."""
    done: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def stamp(context: Any, args: dict[str, Any]) -> dict[str, Any]:
        done.append(args)
        await gate.wait()  # the test breaks Gemini before the next round is asked for
        return {"stamped": args["label"]}

    live.app.tools.register(Tool(
        "stamp", "Stamps something (a write).", stamp,
        {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]},
        safety=Safety.WRITE, timeout=10.0,
    ))
    live.app.gemini_retry.max_attempts = 1
    await functions_on(live, "read, stamp")
    asked = await live.say('use tools: stamp{"label": "x"}, current_time')
    await live.discord.wait_until(lambda: bool(done), 10)
    live.gemini.faults.add("503")  # the round after the write fails: the answer goes to the queue
    gate.set()
    [ack] = await live.wait_replies(asked["id"], timeout=15)
    assert ack.content.startswith(ACK_MARK), ack.content
    live.gemini.faults.clear()
    [_, late] = await live.wait_replies(asked["id"], 2, timeout=30)
    text = marks.strip(late.content)
    assert "- stamp: \"stamp with these arguments was already done for this question" in text, text
    assert "- current_time: {" in text
    assert done == [{"label": "x"}]  # run once, across both tries
