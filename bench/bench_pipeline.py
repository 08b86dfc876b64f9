"""End-to-end cost of the bot's message pipeline against a bare discord.py + google-genai bot.

``python -m bench.bench_pipeline [--quick] [--json] [--n N]``.

Set-up (one process, one event loop): the Discord emulator, the Gemini emulator (no faults,
no latency) and the bot under test all run in-process, the bot on the real discord.py
gateway/REST code and the real google-genai client over loopback TCP. A round trip is: a
user message is dispatched by the emulator -> the bot's ``on_message`` -> Gemini -> the
bot's reply is recorded by the emulator. Round trips are sequential (the next message is
sent once the previous reply is recorded), after a few unmeasured warm-up ones, each
measurement with a fresh pair of emulators. Because the emulators share the loop, the
absolute figures include their CPU time; the difference between the two bots does not.

- BASELINE: a bare ``commands.Bot`` whose ``on_message`` checks the mention, calls
  ``client.aio.models.generate_content`` and ``message.reply(text)``.
- PIPELINE: the real bot (``bot.app.build_application(config)`` + ``bot.client.GeminiBot``):
  dedup, rate limits, durable acceptance in SQLite (WAL, synchronous=FULL, in a temporary
  directory), mutex, breaker/retry/timeout around Gemini, splitting, history, metrics,
  JSON logging at INFO into a discarding stream.
- PIPELINE, HISTORY OFF: the same with ``HISTORY_MAX_MESSAGES=0``, which separates the
  pipeline's own cost from the cost of sending (and the SDK converting) a longer context.
- NOT FOR THE BOT: the awaited ``on_message`` of each bot for a guild message that neither
  mentions nor replies to it (the message every bot sees most), timed in a tight loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import discord
import yarl
from discord.ext import commands
from google import genai
from google.genai import types

from sandbox.__main__ import SANDBOX_DISCORD_TOKEN, SANDBOX_GEMINI_KEY, bot_settings
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import GeminiEmulator

DEFAULT_N = 200
QUICK_N = 30
WARMUP = 5
FAST_EXIT_CALLS = 20_000
FAST_EXIT_REPEATS = 5
FAST_EXIT_TARGET_US = 5.0
ROUND_TRIP_TIMEOUT = 10.0
READY_TIMEOUT = 10.0

OnMessage = Callable[[discord.Message], Awaitable[None]]


class _Discard:
    """A text stream that drops everything (the bots' logs are formatted, then thrown away)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False


# --- shared measuring code -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _emulators() -> AsyncIterator[tuple[DiscordEmulator, GeminiEmulator]]:
    async with (
        DiscordEmulator(token=SANDBOX_DISCORD_TOKEN, heartbeat_interval=5.0) as dc,
        GeminiEmulator(api_key=SANDBOX_GEMINI_KEY) as gm,
    ):
        yield dc, gm


@contextlib.contextmanager
def _discord_pointed_at(dc: DiscordEmulator) -> Any:
    """Aim discord.py at the emulator; restore the previous targets afterwards."""
    old = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = dc.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(dc.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old


@contextlib.asynccontextmanager
async def _connected(bot: discord.Client, dc: DiscordEmulator) -> AsyncIterator[None]:
    """Log ``bot`` in to the emulator, wait until ready, and close it (and its gateway task) after."""
    await bot.login(dc.token)
    connecting = asyncio.create_task(bot.connect(), name="bench-bot-connect")
    try:
        await asyncio.wait_for(bot.wait_until_ready(), READY_TIMEOUT)
        yield
    finally:
        await bot.close()
        await asyncio.wait_for(connecting, READY_TIMEOUT)


async def round_trips(dc: DiscordEmulator, n: int, *, warmup: int = WARMUP) -> list[float]:
    """Seconds per sequential round trip (user mention in #general -> the bot's reply recorded)."""
    channel = dc.channels["general"]
    latencies: list[float] = []
    for i in range(warmup + n):
        replies = len(dc.sent_messages(channel))
        started = time.perf_counter()
        await dc.send_user_message(channel, "normal", "hello", mentions_bot=True)
        await dc.wait_for_bot_message(channel, count=replies + 1, timeout=ROUND_TRIP_TIMEOUT)
        if i >= warmup:
            latencies.append(time.perf_counter() - started)
    return latencies


def stranger_message(bot: discord.Client, dc: DiscordEmulator) -> discord.Message:
    """A real ``discord.Message`` in #general from a member, neither mentioning nor replying to the bot."""
    channel_id = dc.channels["general"]
    data = dc.world.message_payload(channel_id, dc.world.user("normal"), "just chatting, not to the bot")
    channel = bot.get_channel(channel_id)
    if not isinstance(channel, discord.TextChannel):
        raise RuntimeError("the bench bot has no #general in its cache")
    return discord.Message(state=bot._connection, channel=channel, data=data)  # type: ignore[arg-type]


async def fast_exit_us(
    on_message: OnMessage, message: discord.Message, calls: int = FAST_EXIT_CALLS
) -> float:
    """Median microseconds of ``await on_message(message)`` over a few tight loops (GC paused)."""
    samples = []
    for _ in range(FAST_EXIT_REPEATS):
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter_ns()
            for _ in range(calls):
                await on_message(message)
            samples.append((time.perf_counter_ns() - started) / calls / 1000)
        finally:
            gc.enable()
    return statistics.median(samples)


def _stats(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    total = sum(latencies)
    return {
        "n": len(latencies),
        "total_s": total,
        "mean_ms": total / len(latencies) * 1000,
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "per_second": len(latencies) / total,
    }


# --- baseline: a bare discord.py bot calling google-genai ------------------------------------


async def measure_baseline(n: int) -> dict[str, Any]:
    """Round trips and the not-for-the-bot cost of a bare ``commands.Bot`` + google-genai bot."""
    async with _emulators() as (dc, gm):
        gemini = genai.Client(api_key=gm.api_key, http_options=types.HttpOptions(
            base_url=gm.base_url, timeout=10_000, retry_options=types.HttpRetryOptions(attempts=1)))
        intents = discord.Intents.default()
        intents.message_content = True
        bot = commands.Bot(command_prefix=commands.when_mentioned, intents=intents, guild_ready_timeout=0.05)

        async def on_message(message: discord.Message) -> None:
            me = bot.user
            if message.author.bot or me is None or me not in message.mentions:
                return
            prompt = message.content.replace(me.mention, "").strip()
            answer = await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents=prompt)
            await message.reply(answer.text or "(no answer)", allowed_mentions=discord.AllowedMentions.none())

        bot.add_listener(on_message)
        try:
            with _discord_pointed_at(dc):
                async with _connected(bot, dc):
                    latencies = await round_trips(dc, n)
                    not_for_bot = await fast_exit_us(on_message, stranger_message(bot, dc))
        finally:
            await gemini.aio.aclose()
    return {"round_trip": _stats(latencies), "not_for_bot_us": not_for_bot}


# --- the bot's own pipeline ------------------------------------------------------------------


async def measure_pipeline(n: int, **overrides: str) -> dict[str, Any]:
    """Round trips and the not-for-the-bot cost of the real bot (``build_application`` + ``GeminiBot``).

    ``overrides`` are extra settings by variable name (e.g. ``HISTORY_MAX_MESSAGES="0"``).

    Raises ``NotImplementedError`` while the bot's runtime (``bot.app``, ``bot.client``) does
    not import, so the baseline still runs.
    """
    try:
        from bot.app import build_application
        from bot.client import GeminiBot
        from services.config import load_config
    except ImportError as exc:
        raise NotImplementedError(f"the bot's runtime is not importable yet: {exc}") from exc

    async with _emulators() as (dc, gm):
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as data_dir:
            settings = {
                **bot_settings(dc, gm),
                "DATA_DIR": str(Path(data_dir)),
                "HTTP_PORT": "0",
                "LOG_LEVEL": "INFO",
                "LOG_FORMAT": "json",
                # one user sends every message: the cooldown is not what is measured here
                "USER_RATE_LIMIT_PER_MINUTE": "10000",
                "GUILD_RATE_LIMIT_PER_MINUTE": "100000",
                **overrides,
            }
            config = load_config(settings, env_file=None)
            app = build_application(config)
            bot = GeminiBot(app, guild_ready_timeout=0.05)
            with _discord_pointed_at(dc):
                async with _connected(bot, dc):
                    latencies = await round_trips(dc, n)
                    not_for_bot = await fast_exit_us(bot.on_message, stranger_message(bot, dc))
    return {"round_trip": _stats(latencies), "not_for_bot_us": not_for_bot}


# --- running ---------------------------------------------------------------------------------


async def _measure(n: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"n": n, "warmup": WARMUP}
    figures["baseline"] = await measure_baseline(n)
    try:
        figures["pipeline"] = await measure_pipeline(n)
        # The same without conversation history: what the pipeline costs apart from sending
        # a longer context (google-genai converts every history Content through pydantic).
        figures["pipeline_no_history"] = await measure_pipeline(n, HISTORY_MAX_MESSAGES="0")
    except NotImplementedError as exc:
        figures["pipeline"] = figures["pipeline_no_history"] = {"error": str(exc)}
    return figures


def _configure_logging() -> None:
    """INFO-level JSON logging into a discarding stream: the bots pay for their logs, nobody reads them."""
    try:
        from services.logging import configure_logging
    except ImportError:
        return
    configure_logging(level="INFO", fmt="json", stream=_Discard())  # type: ignore[arg-type]


def run(quick: bool = False, n: int | None = None) -> dict[str, Any]:
    """Measure both bots in a fresh event loop; return the figures plus a ``summary`` table."""
    _configure_logging()
    n = n if n is not None else (QUICK_N if quick else DEFAULT_N)
    figures = asyncio.run(_measure(n))
    base = figures["baseline"]
    pipe = figures["pipeline"]
    bare = figures["pipeline_no_history"]
    rows = []
    for key, label in (("mean_ms", "mean"), ("p50_ms", "p50"), ("p95_ms", "p95")):
        rows.append(_row(f"round trip {label}", pipe.get("round_trip", {}).get(key), "ms", "",
                         base["round_trip"][key]))
    rows.append(_row("round trips per second", pipe.get("round_trip", {}).get("per_second"), "msg/s", "",
                     base["round_trip"]["per_second"]))
    for label, result in (("", pipe), (", history off", bare)):
        added = None
        if "round_trip" in result:
            added = result["round_trip"]["mean_ms"] - base["round_trip"]["mean_ms"]
        rows.append(_row(f"pipeline added per message (mean{label})", added, "ms", "", 0.0))
    rows.append(_row("message not for the bot", pipe.get("not_for_bot_us"), "us/message",
                     f"< {FAST_EXIT_TARGET_US:g}", base["not_for_bot_us"]))
    figures["summary"] = rows
    return figures


def _row(figure: str, value: float | None, unit: str, target: str, baseline: float | str) -> dict[str, Any]:
    shown: float | str = round(value, 3) if value is not None else "n/a"
    if isinstance(baseline, float):
        baseline = round(baseline, 3)
    return {"figure": figure, "value": shown, "unit": unit, "target": target, "baseline": baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_N} round trips instead of {DEFAULT_N}")
    parser.add_argument("--n", type=int, help="measured round trips per bot (after warm-up)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")
    started = time.perf_counter()
    result = run(quick=args.quick, n=args.n)
    if args.json:
        print(json.dumps(result))
        return 0
    rows: list[list[str]] = [["figure", "value", "unit", "target", "baseline (bare bot)"]]
    for row in result["summary"]:
        rows.append([
            f"{cell:,.3f}" if isinstance(cell, float) else str(cell)
            for cell in (row["figure"], row["value"], row["unit"], row["target"], row["baseline"])
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if "error" in result["pipeline"]:
        print(f"pipeline not measured: {result['pipeline']['error']}", file=sys.stderr)
    print(f"({time.perf_counter() - started:.1f}s, {result['n']} round trips per bot after "
          f"{result['warmup']} warm-up)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
