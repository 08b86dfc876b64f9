"""Tests for services.logging: JSON/console output, context fields, redaction, idempotence."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import discord
import pytest
import structlog
from discord.ext import commands
from hypothesis import given
from hypothesis import strategies as st

from sandbox.discord_emu import DiscordEmulator
from services.logging import PAYLOAD_HIDDEN, REDACTED, Redactor, configure_logging
from tests.integration.harness import pointed_at

SECRET = "configured-secret-value-123"
BOT_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4OQ.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"
GOOGLE_KEY = "AIza" + "B" * 35

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A stream to log into; restores the root logger and structlog's defaults afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield io.StringIO()
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def json_lines(log_stream: io.StringIO) -> Lines:
    """Configure JSON logging with ``SECRET`` into ``log_stream``; call the result to read the lines."""
    configure_logging("INFO", "json", secrets=[SECRET], stream=log_stream)
    return lambda: [json.loads(line) for line in log_stream.getvalue().splitlines()]


def test_json_format_writes_one_parseable_object_per_event(json_lines: Lines) -> None:
    log = structlog.get_logger("bot.test")
    log.info("first", count=3)
    log.warning("second")
    lines = json_lines()
    assert [(e["event"], e["level"]) for e in lines] == [("first", "info"), ("second", "warning")]
    assert lines[0]["count"] == 3 and lines[0]["logger"] == "bot.test"
    assert lines[0]["timestamp"].endswith("Z")


def test_configured_secret_in_message_and_nested_values_is_redacted(
    json_lines: Lines,
) -> None:
    structlog.get_logger().info(
        f"sending with {SECRET}", payload={"headers": [f"x {SECRET}", {"deep": SECRET}]}, pair=(SECRET, 1)
    )
    (event,) = json_lines()
    assert SECRET not in json.dumps(event)
    assert event["event"] == f"sending with {REDACTED}"
    assert event["payload"] == {"headers": [f"x {REDACTED}", {"deep": REDACTED}]}
    assert event["pair"] == [REDACTED, 1]


def test_secret_in_an_exception_traceback_is_redacted(json_lines: Lines) -> None:
    try:
        raise RuntimeError(f"auth failed for {SECRET}")
    except RuntimeError:
        structlog.get_logger().exception("call failed")
    (event,) = json_lines()
    assert "RuntimeError: auth failed for " + REDACTED in event["exception"]
    assert "Traceback" in event["exception"]
    assert SECRET not in json.dumps(event)


def test_stdlib_records_go_through_the_same_redaction_and_format(
    json_lines: Lines,
) -> None:
    std = logging.getLogger("discord.http")
    std.warning("token %s rejected", SECRET)
    try:
        raise ValueError(SECRET)
    except ValueError:
        std.error("request failed", exc_info=True)
    first, second = json_lines()
    assert (first["event"], first["logger"], first["level"]) == (
        f"token {REDACTED} rejected",
        "discord.http",
        "warning",
    )
    assert f"ValueError: {REDACTED}" in second["exception"]
    assert SECRET not in json.dumps([first, second])


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        (f"Authorization: Bot {BOT_TOKEN}", BOT_TOKEN),
        (f"key {GOOGLE_KEY} in text", GOOGLE_KEY),
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        ("GET https://example.test/v1/models?key=sk-raw-value&alt=sse", "sk-raw-value"),
        (
            "POST https://discord.com/api/v10/interactions/1234567890123/aW50ZXJhY3Rpb246MTIz.x-y_z/callback"
            " with <payload> has returned 204",
            "aW50ZXJhY3Rpb246MTIz.x-y_z",
        ),
        ("PATCH http://127.0.0.1:1/api/v10/webhooks/42/itok-0123456789abcdef/messages/@original", "itok-"),
    ],
)
def test_credential_shapes_are_redacted_even_when_not_configured(text: str, hidden: str) -> None:
    redacted = Redactor().redact(text)
    assert hidden not in redacted
    assert REDACTED in redacted


def test_ordinary_text_is_left_alone() -> None:
    text = "Bot reconnected to gateway after 3.5s; shard.id=0 model=gemini-2.5-flash key_count=2"
    assert Redactor(["xy"]).redact(text) == text  # secrets under 4 characters are ignored


def test_values_under_secret_looking_keys_are_hidden(json_lines: Lines) -> None:
    structlog.get_logger().info("headers", headers={"Authorization": "short", "x-goog-api-key": "k1"})
    (event,) = json_lines()
    assert event["headers"] == {"Authorization": REDACTED, "x-goog-api-key": REDACTED}


def test_objects_whose_repr_holds_a_secret_are_redacted(json_lines: Lines) -> None:
    class Holder:
        def __repr__(self) -> str:
            return f"Holder({SECRET})"

    structlog.get_logger().info("obj", thing=Holder(), error=ValueError(SECRET))
    (event,) = json_lines()
    assert event["thing"] == f"Holder({REDACTED})"
    assert SECRET not in json.dumps(event)


def test_context_fields_appear_on_structlog_and_stdlib_events(
    json_lines: Lines,
) -> None:
    structlog.contextvars.bind_contextvars(trace_id="t-42", guild=7, channel=8, user=9)
    structlog.get_logger().info("from structlog")
    logging.getLogger("google_genai").info("from stdlib")
    for event in json_lines():
        assert (event["trace_id"], event["guild"], event["channel"], event["user"]) == ("t-42", 7, 8, 9)


def test_level_filters_both_kinds_of_logger(json_lines: Lines) -> None:
    structlog.get_logger().debug("hidden")
    logging.getLogger("aiohttp.client").debug("hidden too")
    structlog.get_logger().info("shown")
    assert [e["event"] for e in json_lines()] == ["shown"]


def test_configuring_twice_does_not_duplicate_output(log_stream: io.StringIO) -> None:
    root = logging.getLogger()
    configure_logging("INFO", "json", stream=log_stream)
    count = len(root.handlers)
    configure_logging("INFO", "json", secrets=[SECRET], stream=log_stream)
    assert len(root.handlers) == count
    structlog.get_logger().info(f"once {SECRET}")
    logging.getLogger("discord").info("stdlib once")
    assert [json.loads(line)["event"] for line in log_stream.getvalue().splitlines()] == [
        f"once {REDACTED}",
        "stdlib once",
    ]


def test_console_format_is_readable_and_redacted(log_stream: io.StringIO) -> None:
    configure_logging("INFO", "console", secrets=[SECRET], stream=log_stream)
    structlog.contextvars.bind_contextvars(trace_id="t-1")
    try:
        raise KeyError(SECRET)
    except KeyError:
        structlog.get_logger("bot.pipeline").exception("answer failed", detail=SECRET)
    out = log_stream.getvalue()
    assert "answer failed" in out and "trace_id=t-1" in out and "bot.pipeline" in out
    assert "Traceback" in out and "KeyError" in out
    assert "\x1b[" not in out  # no colour codes when the stream is not a terminal
    assert SECRET not in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


@given(
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=4, max_size=24),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
def test_a_configured_secret_never_survives_redaction_whatever_surrounds_it(
    secret: str, before: str, after: str
) -> None:
    assert secret not in Redactor([secret, "other-secret"]).redact(before + secret + after + secret)


def test_redaction_stays_linear_on_a_long_base64_like_blob() -> None:
    """A naive token regex backtracks quadratically: 200k characters would take over a minute."""
    blob = "A" * 200_000
    started = time.perf_counter()
    assert Redactor(["some-secret"]).redact(blob) == blob
    assert time.perf_counter() - started < 2.0


# --- discord.py's DEBUG payloads: hidden unless LOG_PAYLOADS --------------------------------------


USER_TEXT = "my secret diary entry 7f3a"


async def _chat_through_real_discord_py(stream: io.StringIO, *, log_payloads: bool) -> list[dict[str, Any]]:
    """At DEBUG, a real discord.py bot logs in to the Discord emulator, hears a user's message
    (a gateway event) and answers it with that text (an HTTP request); return the log lines."""
    configure_logging("DEBUG", "json", stream=stream, log_payloads=log_payloads)
    intents = discord.Intents.default()
    intents.members = True
    intents.message_content = True
    bot = commands.Bot(command_prefix="!", intents=intents, guild_ready_timeout=0.05)

    async def on_message(message: discord.Message) -> None:
        if not message.author.bot:
            await message.channel.send("you said: " + message.content)

    bot.add_listener(on_message)
    async with DiscordEmulator(heartbeat_interval=1.0) as emu:
        with pointed_at(emu):
            await bot.login(emu.token)
            task = asyncio.create_task(bot.connect())
            try:
                async with asyncio.timeout(10):
                    await bot.wait_until_ready()
                general = emu.channels["general"]
                await emu.send_user_message(general, content=USER_TEXT)
                await emu.wait_for_bot_message(general, timeout=10)
            finally:
                await bot.close()
                await asyncio.wait_for(task, 10)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _discord_debug(lines: list[dict[str, Any]], logger: str) -> list[str]:
    return [e["event"] for e in lines if e.get("logger") == logger and e.get("level") == "debug"]


async def test_at_debug_discord_pys_gateway_and_http_lines_never_carry_users_messages(
    log_stream: io.StringIO,
) -> None:
    """LOG_LEVEL=DEBUG, LOG_PAYLOADS off: discord.py still logs every event and request, with the
    payloads replaced by a marker, and the user's words appear nowhere in the output."""
    lines = await _chat_through_real_discord_py(log_stream, log_payloads=False)
    assert USER_TEXT not in log_stream.getvalue()
    gateway = _discord_debug(lines, "discord.gateway")
    http = _discord_debug(lines, "discord.http")
    assert any(f"WebSocket Event: {PAYLOAD_HIDDEN}" in e for e in gateway), gateway
    assert any(f"with {PAYLOAD_HIDDEN} has returned 200" in e for e in http), http
    assert any(e.startswith("POST ") and "/messages" in e for e in http)  # route and status stay


async def test_log_payloads_logs_discord_pys_payloads_whole(log_stream: io.StringIO) -> None:
    lines = await _chat_through_real_discord_py(log_stream, log_payloads=True)
    gateway = _discord_debug(lines, "discord.gateway")
    http = _discord_debug(lines, "discord.http")
    assert any(USER_TEXT in e and "MESSAGE_CREATE" in e for e in gateway)
    assert any(f"you said: {USER_TEXT}" in e for e in http)
    assert PAYLOAD_HIDDEN not in log_stream.getvalue()


def test_a_lone_dict_argument_is_hidden_and_other_loggers_and_levels_are_left_alone(
    log_stream: io.StringIO,
) -> None:
    """logging makes a lone dict argument the record's args; it is hidden too. Lines at INFO and
    above, and other libraries' lines, are not touched (the redactor still covers secrets)."""
    configure_logging("DEBUG", "json", stream=log_stream)
    logging.getLogger("discord.gateway").debug("Updating our voice state to %s.", {"content": USER_TEXT})
    logging.getLogger("discord.http").debug("%s %s has returned %s", "GET", "https://x.test/api", 200)
    logging.getLogger("discord.client").info("kept %s", {"note": "info"})
    logging.getLogger("aiohttp.client").debug("kept %s", {"note": "other library"})
    events = [json.loads(line)["event"] for line in log_stream.getvalue().splitlines()]
    assert events == [
        f"Updating our voice state to {PAYLOAD_HIDDEN}.",
        "GET https://x.test/api has returned 200",
        "kept {'note': 'info'}",
        "kept {'note': 'other library'}",
    ]


def test_discord_pys_reconnect_attempts_are_one_warning_line_without_a_stack(json_lines: Lines) -> None:
    """discord.py logs each attempt to reach an unreachable gateway with ``_log.exception``: one
    warning line naming the error, not an error with a traceback (an outage is no bug)."""
    try:
        raise ConnectionResetError("503 from the gateway")
    except ConnectionResetError:
        logging.getLogger("discord.client").exception("Attempting a reconnect in %.2fs", 1.5)
    [line] = json_lines()
    assert line["level"] == "warning" and "exception" not in line
    assert line["event"] == "Attempting a reconnect in 1.50s (ConnectionResetError: 503 from the gateway)"

