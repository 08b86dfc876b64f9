"""Tokens, cost and quotas, end to end: every answer's usage_metadata is charged to its user, guild and
model in the transaction that finishes it; daily quotas refuse one user (or one server) and nobody
else; ``/usage`` and ``/admin usage`` show it; the history sent to Gemini is bounded in tokens.

Real discord.py and google-genai against the emulators; the emulated Gemini counts about four
characters a token, so "hello" with the default persona costs about 60 tokens.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import texts
from resilience.degradation import ItemState
from sandbox.discord_state import MANAGE_GUILD
from services.storage import UsageTotals, usage_day
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run

QUIET = 0.4


async def settled(live: Live) -> None:
    """Until every accepted message is finished (its usage is written with the finish)."""
    async with asyncio.timeout(10):
        while any(i.state is not ItemState.DONE for i in await live.app.storage.list()):
            await asyncio.sleep(0.02)


async def today(live: Live, **who: int) -> UsageTotals:
    day = usage_day(live.app.clock.time())
    return await live.app.storage.usage_totals(day, day, **who)


def user_id(live: Live, name: str) -> int:
    return live.discord.users[name]


async def test_one_users_exhausted_quota_does_not_affect_another(tmp_path: Path) -> None:
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", QUOTA_USER_TOKENS_PER_DAY="50") as live,
    ):
        first = await live.say("hello")
        [answer] = await live.wait_replies(first["id"])
        assert answer.content.startswith("Hello! I am the sandbox Gemini")
        await settled(live)
        used = (await today(live, user_id=user_id(live, "normal"))).counted
        assert used >= 50

        over = await live.say("hello again")
        [refusal] = await live.wait_replies(over["id"])
        assert re.fullmatch(
            r"You have used today's allowance of 50 Gemini tokens, so I can't answer more today; "
            r"it resets at midnight UTC, in [\d.]+ (s|min|h)\.",
            refusal.content,
        ), refusal.content
        # The notice once per window (NoticeLimiter), then a reaction, never a flood of posts.
        third = await live.say("and again")
        await live.discord.wait_until(lambda: bool(live.discord.reactions(int(third["id"]))), 5)
        assert "\U0001faab" in live.discord.reactions(int(third["id"]))
        assert live.replies_to(third["id"]) == []

        other = await live.say("hello", author="admin")
        [answered] = await live.wait_replies(other["id"])
        assert answered.content.startswith("Hello! I am the sandbox Gemini")
        assert len([r for r in live.gemini.requests if r.action == "generateContent"]) == 2
        await settled(live)
        assert (await today(live, user_id=user_id(live, "normal"))).counted == used  # refusals cost nothing


async def test_a_servers_quota_holds_its_members_and_not_a_dm(tmp_path: Path) -> None:
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", QUOTA_GUILD_TOKENS_PER_DAY="50") as live,
    ):
        first = await live.say("hello")
        await live.wait_replies(first["id"])
        await settled(live)
        member = await live.say("hello", author="admin")
        [refusal] = await live.wait_replies(member["id"])
        assert refusal.content.startswith("This server has used today's allowance of 50 Gemini tokens")
        dm = live.discord.dm_channel("admin")
        private = await live.say("hello", channel=dm, author="admin", mention=False)
        [answer] = await live.wait_replies(private["id"], channel=dm)
        assert answer.content.startswith("Hello! I am the sandbox Gemini")


async def test_usage_is_written_with_the_finish_and_costs_no_storage_call_of_its_own(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        storage = live.app.storage
        calls: list[str] = []
        run_transaction = storage._run

        async def spy(operation: str, body: Any, *, write: bool = True) -> Any:
            calls.append(operation)
            return await run_transaction(operation, body, write=write)

        storage._run = spy  # type: ignore[method-assign]  # observes, changes nothing
        asked = await live.say("think step by step: what is two plus two")
        await live.wait_replies(asked["id"])
        await settled(live)
        calls_after = [c for c in calls if c not in ("list", "stats", "claim", "expire", "housekeeping")]
        assert calls_after == ["accept", "finish"]
        storage._run = run_transaction  # type: ignore[method-assign]

        usage = await today(live, user_id=user_id(live, "normal"))
        assert usage.calls == 1 and usage.thought == 64 and usage.prompt > 0 and usage.output > 0
        guild = live.discord.world.channel_guild(live.general)
        assert await today(live, guild_id=guild) == usage
        day = usage_day(live.app.clock.time())
        assert list(await storage.usage_by_model(day, day)) == ["gemini-2.5-flash"]

        def sample(kind: str) -> float | None:
            return live.app.metrics.registry.get_sample_value(
                "bot_gemini_tokens_total", {"kind": kind, "model": "gemini-2.5-flash"}
            )

        assert (sample("prompt"), sample("output"), sample("thought")) == (usage.prompt, usage.output, 64)


async def test_a_quota_used_up_before_a_restart_stays_used_up(tmp_path: Path) -> None:
    async with running_emulators() as emus:
        async with live_bot(emus, tmp_path / "data", QUOTA_USER_TOKENS_PER_DAY="50") as live:
            asked = await live.say("hello")
            await live.wait_replies(asked["id"])
            await settled(live)
        async with live_bot(emus, tmp_path / "data", QUOTA_USER_TOKENS_PER_DAY="50") as again:
            over = await again.say("hello again")
            [refusal] = await again.wait_replies(over["id"])
            assert refusal.content.startswith("You have used today's allowance of 50 Gemini tokens")


async def test_history_over_its_token_budget_is_cut_and_the_user_told_once(tmp_path: Path) -> None:
    """HISTORY_MAX_TOKENS=40: two earlier turns of about 10 tokens each fit, the third does not."""
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", HISTORY_MAX_TOKENS="40") as live,
    ):
        seen = []
        for n in range(5):
            asked = await live.say(f"question number {n} " + "x" * 20)
            [answer] = await live.wait_replies(asked["id"])
            seen.append(answer.content)
        notes = [content for content in seen if "This conversation is long" in content]
        assert len(notes) == 1, seen
        assert "I'm using the last 2 messages of it" in notes[0]
        contents = [r.body["contents"] for r in live.gemini.requests if r.action == "generateContent"]
        assert [len(c) for c in contents] == [1, 3, 3, 3, 3]


@pytest.fixture
async def slash(tmp_path: Path) -> AsyncIterator[Live]:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        owner = world.add_member("owner", "carol")
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        async with live_bot(
            emus, tmp_path / "data", ADMIN_USER_IDS=str(owner), QUOTA_USER_TOKENS_PER_DAY="100000"
        ) as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


async def test_usage_for_me_my_server_and_the_bot(slash: Live) -> None:
    live = slash
    for author in ("normal", "normal", "manager"):
        asked = await live.say("hello", author=author)
        await live.wait_replies(asked["id"])
    await settled(live)
    mine = await today(live, user_id=user_id(live, "normal"))
    theirs = await today(live, user_id=user_id(live, "manager"))

    text = only_text(await run(live, "usage", {}, user="normal"))
    assert text.startswith(f"You have used, today (UTC): **{mine.counted:,} tokens** in 2 answers")
    assert f"Daily allowance: 100,000 tokens, {100_000 - mine.counted:,} left" in text

    refused = only_text(await run(live, "usage", {"server": True}, user="normal"))
    assert refused == texts.managers_only()
    server = only_text(await run(live, "usage", {"server": True}, user="manager"))
    total = mine.counted + theirs.counted
    assert server.startswith(f"This server has used, today (UTC): **{total:,} tokens** in 3 answers")
    assert f"Top users today: <@{user_id(live, 'normal')}> {mine.counted:,}" in server

    assert only_text(await run(live, "admin", {"usage": {}}, user="normal")) == texts.owners_only()
    report = only_text(await run(live, "admin", {"usage": {"days": 7}}, user="owner"))
    assert report.startswith(f"The bot used, the last 7 days: **{total:,} tokens** in 3 answers")
    assert f"- `gemini-2.5-flash`: **{total:,} tokens**" in report
    assert f"Top servers: `{live.discord.world.channel_guild(live.general)}` {total:,}" in report
    assert "Quotas: users 100,000 tokens a day; servers unlimited" in report


async def test_ask_over_the_quota_gets_the_sentence_and_the_memory_view_counts_the_ledger(
    tmp_path: Path,
) -> None:
    async with (
        running_emulators() as emus,
        live_bot(emus, tmp_path / "data", QUOTA_USER_TOKENS_PER_DAY="50") as live,
    ):
        live.bot.install_commands()
        await live.bot.tree.sync()
        first = await run(live, "ask", {"prompt": "hello"})
        assert first.followups[0].content.startswith("Hello! I am the sandbox Gemini")
        await settled(live)
        over = await run(live, "ask", {"prompt": "hello again"})
        assert only_text(over).startswith("You have used today's allowance of 50 Gemini tokens")
        caches = live.app.http_api.sources.caches
        assert caches["quota_owners"]() == 1  # the one user (no server quota is set)
        assert len([r for r in live.gemini.requests if r.action == "generateContent"]) == 1
