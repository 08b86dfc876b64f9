"""OpenTelemetry export from the real bot process: ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, the SDK's
OTLP/HTTP exporter sends to an OTLP receiver on loopback in the test (aiohttp decoding the
protobuf requests with opentelemetry-proto), and one message's spans arrive as one trace whose id
is the one the bot's trace view shows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators


@dataclass
class Received:
    """One span as the receiver decoded it."""

    trace_id: str
    span_id: str
    parent: str
    name: str
    attributes: dict[str, object]
    service: str


@dataclass
class Receiver:
    url: str
    spans: list[Received] = field(default_factory=list)
    requests: int = 0


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 port 0 (``POST /v1/traces``, protobuf)."""
    got = Receiver("")

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        got.requests += 1
        for resource_spans in message.resource_spans:
            resource = resource_spans.resource.attributes
            service = next((a.value.string_value for a in resource if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    got.spans.append(
                        Received(
                            span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                            attributes, service,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    got.url = f"http://127.0.0.1:{port}"
    try:
        yield got
    finally:
        await runner.cleanup()


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


async def test_one_messages_spans_reach_the_collector_as_one_trace(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str], receiver: Receiver
) -> None:
    bot_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
    bot_env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # the SDK's batch delay (ms): export soon after the end
    proc = spawn_bot()
    await proc.wait_ready(emulators)
    line = await proc.wait_for_log(lambda r: r.get("event") == "http_api.listening", timeout=10)
    discord = emulators.discord
    channel = discord.channels["general"]
    msg = await discord.send_user_message(channel, content="hello", mentions_bot=True)
    await discord.wait_until(
        lambda: any(
            str((m.message_reference or {}).get("message_id")) == str(msg["id"])
            for m in discord.sent_messages(channel)
        ),
        10,
    )

    headers = {"Authorization": f"Bearer {bot_env['ADMIN_API_TOKEN']}"}
    url = f"http://127.0.0.1:{line['port']}/api/traces?route=message"
    async with aiohttp.ClientSession() as session, asyncio.timeout(10):
        while True:  # the trace is kept once the bot has recorded the answer, just after sending it
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
                listed = (await resp.json())["traces"]
            if listed:
                break
            await asyncio.sleep(0.05)
    [shown] = listed
    trace_id = shown["trace_id"]
    assert len(trace_id) == 32  # OpenTelemetry's

    async with asyncio.timeout(10):
        while not any(s.trace_id == trace_id and s.name == "message" for s in receiver.spans):
            await asyncio.sleep(0.05)
    mine = [s for s in receiver.spans if s.trace_id == trace_id]
    names = sorted(s.name for s in mine)
    steps = {"message", "accept", "mutex.wait", "gemini.generate", "gemini.attempt", "deliver"}
    steps.add("discord.send")
    assert steps <= set(names), names
    assert len(mine) == shown["spans"] + 1  # every step the bot kept, and the root
    [root] = [s for s in mine if not s.parent]
    assert root.name == "message" and root.service == "gemini-discord-bot"
    assert root.attributes["user"] == discord.users["normal"] and root.attributes["route"] == "message"
    ids = {s.span_id for s in mine}
    assert all(s.parent in ids for s in mine if s.parent)
    by_id = {s.span_id: s for s in mine}
    attempt = next(s for s in mine if s.name == "gemini.attempt")
    assert by_id[attempt.parent].name == "gemini.generate"
    assert attempt.attributes["dependency"] == "gemini" and attempt.attributes["model"]
    assert "hello" not in str([s.attributes for s in mine])
    proc.assert_clean_logs()
