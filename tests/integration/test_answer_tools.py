"""Tools Google runs, per guild: Search grounding with its sources after the answer, URL context, code
execution shown as fenced code and output. Real discord.py and google-genai against the emulators.

The first guild's ``manager`` has Manage Server; the second guild (``elsewhere``) keeps the default:
every tool off.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import marks
from sandbox.discord_state import MANAGE_GUILD
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        other = world.add_guild("Elsewhere", owner="boss")
        world.add_text_channel("elsewhere", guild_id=other)
        world.add_member("boss", "bea")
        async with live_bot(emus, tmp_path / "data") as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


def last_request_tools(live: Live) -> list[dict[str, object]] | None:
    [*_, request] = [r for r in live.gemini.requests if r.action == "generateContent"]
    tools = request.body.get("tools")
    return None if tools is None else list(tools)


async def test_a_grounded_answer_shows_its_sources_once_a_manager_turns_search_on(live: Live) -> None:
    before = await live.say("who won the euro 2024")
    [plain] = await live.wait_replies(before["id"])
    assert last_request_tools(live) is None and "Sources" not in plain.content  # off by default

    turned = await run(live, "server", {"tools": {"on": {"tool": "google_search"}}}, user="manager")
    assert "- Google Search grounding (answers cite web sources): on" in only_text(turned)
    asked = await live.say("who won the euro 2024")
    [answer] = await live.wait_replies(asked["id"])
    assert last_request_tools(live) == [{"googleSearch": {}}]
    text = marks.strip(answer.content)
    assert text.endswith(
        "\n\n-# Sources: [example.com](https://example.com/search/who-won-the-euro-2024/1)"
        " \u00b7 [example.org](<https://example.org/search/who-won-the-euro-2024/2>)"
        " \u00b7 [example.net](<https://example.net/search/who-won-the-euro-2024/3>)"
    )
    # Only the first link may get a preview: every other one is in angle brackets.
    assert len(re.findall(r"\]\(https://", text)) == 1 and answer.pings == {f"user:{asked['author']['id']}"}
    # The stored answer (the next question's context) is the answer without its sources.
    history = await live.app.storage.history(str(live.general))
    assert "Sources" not in history[-1].text

    elsewhere = live.discord.channels["elsewhere"]
    other = await live.say("who won the euro 2024", channel=elsewhere)
    [ungrounded] = await live.wait_replies(other["id"], channel=elsewhere)
    assert last_request_tools(live) is None and "Sources" not in ungrounded.content

    off = await run(live, "server", {"tools": {"off": {"tool": "google_search"}}}, user="manager")
    assert "- Google Search grounding (answers cite web sources): off" in only_text(off)
    again = await live.say("who won the euro 2024")
    await live.wait_replies(again["id"])
    assert last_request_tools(live) is None


async def test_code_execution_and_url_context_are_sent_and_shown(live: Live) -> None:
    for tool in ("code_execution", "url_context"):
        await run(live, "server", {"tools": {"on": {"tool": tool}}}, user="manager")
    status = only_text(await run(live, "server", {"tools": {"status": {}}}, user="manager"))
    assert status.endswith(
        "- Google Search grounding (answers cite web sources): off\n"
        "- URL context (I read the links you send): on\n"
        "- code execution (I run Python to calculate): on"
    )
    guild = str(live.discord.world.channel_guild(live.general))
    saved = live.app.store.cached("guild_settings")
    assert saved is not None
    assert saved["guilds"][guild]["tools"] == {"code_execution": True, "url_context": True}

    asked = await live.say("calculate the sum of 1 to 100")
    [answer] = await live.wait_replies(asked["id"])
    assert last_request_tools(live) == [{"urlContext": {}}, {"codeExecution": {}}]
    assert marks.strip(answer.content) == (
        "I'll calculate that with code.\n"
        "```python\ntotal = sum(range(1, 100 + 1))\nprint(total)\n```\n"
        "Output:\n```\n5050\n```\n"
        "The sum of 1 to 100 is 5050."
    )

    read = await live.say("no search: summarise https://docs.example/page")
    [summary] = await live.wait_replies(read["id"])
    assert marks.strip(summary.content).endswith("\n\n-# Sources: [docs.example](https://docs.example/page)")


async def test_a_member_cannot_turn_tools_on(live: Live) -> None:
    refused = await run(live, "server", {"tools": {"on": {"tool": "google_search"}}}, user="normal")
    assert "Manage Server" in only_text(refused)
    assert live.app.guild_tools(live.discord.world.channel_guild(live.general)) == ()
