"""Traces and error groups on the real path: the bot in-process (real discord.py and google-genai
against the emulators, SQLite on disk), its HTTP API on loopback, its slash commands.

The "bug" below is a stand-in: the answer splitter of the bot (our code, not a library) is
replaced by one that raises, which is what a bug in the pipeline looks like to the user.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import bot.answering
from bot import texts
from services.otel import OtelTracing
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import run

TOKEN = secrets.token_urlsafe(24)
SECRET_QUESTION = "my llama's name is Bartholomew"
BUG_TEXT = "split exploded on " + SECRET_QUESTION
APOLOGY_ID = re.compile(r"trace id `([0-9a-f]+)`")


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """The bot with an admin token, slow traces from 0.2 s, and its commands synced; ``owner`` is
    one of its owners (ADMIN_USER_IDS)."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        owner = emus.discord.world.add_member("owner", "carol")
        settings = {"ADMIN_API_TOKEN": TOKEN, "TRACE_SLOW_SECONDS": "0.2", "ADMIN_USER_IDS": str(owner)}
        async with live_bot(emus, tmp_path / "data", **settings) as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


async def get(live: Live, path: str, *, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(live.app.http_api.url + path, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def bug(*_: object, **__: object) -> list[str]:
    raise RuntimeError(BUG_TEXT)


async def apology_trace_id(live: Live, monkeypatch: pytest.MonkeyPatch) -> str:
    """Send a question whose answer meets a bug; return the trace id the apology quotes."""
    monkeypatch.setattr(bot.answering, "split_message", bug)
    msg = await live.say(SECRET_QUESTION)
    [reply] = await live.wait_replies(msg["id"])
    assert reply.content.startswith(texts.bug("").partition("(")[0]), reply.content
    match = APOLOGY_ID.search(reply.content)
    assert match is not None, reply.content
    monkeypatch.undo()
    # The trace is kept when the request ends, just after the apology went out.
    await live.discord.wait_until(lambda: live.app.traces.get(match.group(1)) is not None, 5)
    return match.group(1)


async def test_the_trace_id_in_a_bug_apology_shows_its_spans(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The apology's trace id finds the request at GET /api/traces/{id} (admin token): its steps
    from acceptance through the lock, Gemini and its attempt to the apology's send, marked failed,
    with no word of the question or the bug's message. Without the token: 401; an unknown id: 404."""
    live.gemini.faults.add("latency", seconds=0.3, count=1)  # slow enough to be a slow trace
    trace_id = await apology_trace_id(live, monkeypatch)

    status, body = await get(live, f"/api/traces/{trace_id}")
    assert status == 200, body
    assert (body["trace_id"], body["name"], body["error"]) == (trace_id, "message", "RuntimeError")
    assert body["fields"]["user"] == live.discord.users["normal"]
    steps = [(s["name"], s["depth"]) for s in body["spans"]]
    for step in [("accept", 0), ("mutex.wait", 0), ("gemini.attempt", 1), ("gemini.generate", 0)]:
        assert step in steps, steps
    assert steps[-1] == ("discord.send", 0)  # the apology itself
    attempt = next(s for s in body["spans"] if s["name"] == "gemini.attempt")
    assert attempt["duration"] >= 0.3 and attempt["attributes"]["model"] == live.app.config.gemini_model
    assert "gemini.attempt" in body["slow_spans"]
    assert SECRET_QUESTION not in str(body) and "exploded" not in str(body)

    status, body = await get(live, f"/api/traces/{trace_id}", token=None)
    assert status == 401 and body["error"] == "unauthorized"
    status, body = await get(live, "/api/traces/0123456789ab")
    assert status == 404 and "no trace '0123456789ab' is kept" in body["message"]

    status, body = await get(live, "/api/traces?slow=1")
    assert status == 200 and [t["trace_id"] for t in body["traces"]] == [trace_id]
    assert body["slow_threshold"] == 0.2
    status, body = await get(live, "/api/traces?route=message&window=60")
    assert status == 200 and trace_id in [t["trace_id"] for t in body["traces"]]
    assert body["latency"]["count"] == len(body["traces"]) and body["latency"]["p95"] >= 0.3
    status, body = await get(live, "/api/traces?slow=maybe")
    assert status == 400


async def test_failures_are_grouped_by_fingerprint_with_their_users_and_traces(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/health/errors (no token, like the health views): the bug is one group (internal,
    RuntimeError, charged to the bot, on the message route) with its user and the apology's trace
    id; Gemini's 503s are another, counted per failed attempt, charged to gemini."""
    trace_id = await apology_trace_id(live, monkeypatch)
    live.gemini.faults.add("503", count=2)
    other = live.discord.channels["random"]  # the bugged question still holds its conversation
    msg = await live.say("hello again", channel=other)
    await live.wait_replies(msg["id"], channel=other, answers_only=True)
    await live.discord.wait_until(lambda: len(live.app.traces.recent()) >= 2, 5)

    status, body = await get(live, "/api/health/errors", token=None)
    assert status == 200, body
    groups = {(g["error"], g["dependency"]): g for g in body["groups"]}
    bug_group = groups[("RuntimeError", "bot")]
    assert (bug_group["category"], bug_group["route"], bug_group["count"]) == ("internal", "message", 1)
    assert (bug_group["users"], bug_group["guilds"]) == (1, 1)
    assert bug_group["sample_trace_ids"] == [trace_id]
    assert bug_group["windows"] == {"5m": 1, "1h": 1, "24h": 1}
    unavailable = groups[("ServerError", "gemini")]
    assert (unavailable["category"], unavailable["count"]) == ("unavailable", 2)
    assert SECRET_QUESTION not in str(body) and "exploded" not in str(body)


async def test_admin_trace_and_admin_errors_for_owners_only(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/admin trace <id>`` shows the steps of the apology's request; ``/admin errors`` the groups,
    each with a trace to look at; a member who is not an owner is refused both."""
    trace_id = await apology_trace_id(live, monkeypatch)

    record = await run(live, "admin", {"trace": {"trace_id": trace_id}}, user="owner")
    [shown] = record.texts()
    assert record.ephemeral
    assert shown.startswith(f"Trace `{trace_id}`: message, ") and "failed: RuntimeError" in shown
    assert "• `gemini.generate`" in shown and "\n  • `gemini.attempt`" in shown
    assert SECRET_QUESTION not in shown

    record = await run(live, "admin", {"errors": {}}, user="owner")
    [shown] = record.texts()
    assert "internal RuntimeError in bot (message): 1 / 1 / 1 in 5 min / 1 h / 24 h" in shown
    assert f"`/admin trace {trace_id}`" in shown

    record = await run(live, "admin", {"trace": {"trace_id": "nope"}}, user="owner")
    assert record.texts()[0].startswith("No trace 'nope' is kept: the bot keeps the last 200 requests")
    for options in ({"trace": {"trace_id": trace_id}}, {"errors": {}}):
        record = await run(live, "admin", options, user="normal")
        assert record.texts() == [texts.owners_only()]


async def test_with_opentelemetry_the_spans_of_one_message_form_one_trace(live: Live) -> None:
    """With an OpenTelemetry exporter (the SDK's in-memory one) the trace id of a message is
    OpenTelemetry's: every span of the message is in that one trace, each under the span that
    encloses it (the root has none), with the attributes the built-in trace shows."""
    memory = InMemorySpanExporter()
    live.app.traces.exporter = OtelTracing.with_processor(SimpleSpanProcessor(memory))
    msg = await live.say("hello")
    await live.wait_replies(msg["id"], answers_only=True)
    await live.discord.wait_until(lambda: any(s.name == "message" for s in memory.get_finished_spans()), 5)
    await live.discord.wait_until(lambda: any(r.name == "message" for r in live.app.traces.recent()), 5)

    record = next(r for r in live.app.traces.recent() if r.name == "message")
    spans = memory.get_finished_spans()
    assert len(record.trace_id) == 32
    assert {format(s.context.trace_id, "032x") for s in spans} == {record.trace_id}
    [root] = [s for s in spans if s.parent is None]
    assert root.name == "message" and root.attributes["user"] == live.discord.users["normal"]
    by_id = {s.context.span_id: s for s in spans}
    assert all(s.parent.span_id in by_id for s in spans if s.parent is not None)
    attempt = next(s for s in spans if s.name == "gemini.attempt")
    assert by_id[attempt.parent.span_id].name == "gemini.generate"  # type: ignore[union-attr]
    assert sorted(s.name for s in spans if s.parent is not None) == sorted(s.name for s in record.spans)
    kept = next(s for s in record.spans if s.name == "gemini.attempt")
    assert dict(attempt.attributes or {}) == dict(kept.attributes)

    status, body = await get(live, f"/api/traces/{record.trace_id}")
    assert status == 200 and body["trace_id"] == record.trace_id
