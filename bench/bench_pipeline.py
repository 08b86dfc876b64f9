"""End-to-end cost of the bot's message pipeline against a bare discord.py + google-genai bot.

``python -m bench.bench_pipeline [--quick] [--json] [--n N] [--rounds R]``.

Set-up (one process, one event loop): the Discord emulator, the Gemini emulator (no faults,
no latency) and the bot under test all run in-process, the bot on the real discord.py
gateway/REST code and the real google-genai client over loopback TCP. A round trip is: a
user message is dispatched by the emulator -> the bot's ``on_message`` -> Gemini -> the
bot's reply is recorded by the emulator. Round trips are sequential (the next message is
sent once the previous reply is recorded), after a few unmeasured warm-up ones, each
measurement with a fresh pair of emulators. Because the emulators share the loop, the
absolute figures include their CPU time; the difference between two bots does not. The
four bots are measured in ``rounds`` interleaved rounds (the order rotates every round),
so a machine that slows down part-way slows them all alike.

- BARE BOT, WITH HISTORY (the baseline the target is measured against): a ``commands.Bot``
  doing the same user-visible work as the bot, the way a naive bot would: on a mention it
  sends the channel's in-memory history (a list of plain ``Content`` dicts bounded to
  ``HISTORY_MAX_MESSAGES``) plus the prompt to ``client.aio.models.generate_content`` with
  the same model and persona (system instruction), replies with the text, and appends the
  exchange to the history. No durability, no dedup, no limits, no breaker.
- BARE BOT, NO HISTORY (the first baseline, kept for comparison): the prompt alone, no
  persona, no memory.
- PIPELINE: the real bot (``bot.app.build_application(config)`` + ``bot.client.GeminiBot``):
  dedup, rate limits, durable acceptance in SQLite (WAL, ``synchronous=NORMAL`` as
  ``build_application`` builds it, in a temporary directory), mutex, breaker/retry/timeout
  around Gemini, splitting, chunk nonces, history stored, metrics, JSON logging at INFO
  into a discarding stream.
- PIPELINE, HISTORY OFF: the same with ``HISTORY_MAX_MESSAGES=0``, which separates the
  pipeline's own cost from the cost of sending (and the SDK converting) a longer context.
- NOT FOR THE BOT: the awaited ``on_message`` of each bot for a guild message that neither
  mentions nor replies to it (the message every bot sees most), timed in a tight loop.

Besides wall time, each bot's process CPU per measured round trip is shown (bot, emulators and
SQLite's thread together): on a shared machine it moves less than wall time. The added share
is given on the mean (the target), on p50, and as the median over rounds of each round's
ratio (a busy spell inflates one round, and moves that figure least).

Targets (issue 5): a message not for the bot costs < 5 us; the pipeline adds at most 25% to
the bare bot's (with history) mean round trip.
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

from bot.app import build_application
from bot.client import GeminiBot
from sandbox.__main__ import SANDBOX_DISCORD_TOKEN, SANDBOX_GEMINI_KEY, bot_settings
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import GeminiEmulator
from services.config import Config, load_config

DEFAULT_N = 200
QUICK_N = 30
DEFAULT_ROUNDS = 8
QUICK_ROUNDS = 2
WARMUP = 5
FAST_EXIT_CALLS = 20_000
FAST_EXIT_REPEATS = 5
FAST_EXIT_TARGET_US = 5.0
ADDED_TARGET_PERCENT = 25.0
ROUND_TRIP_TIMEOUT = 10.0
READY_TIMEOUT = 10.0

OnMessage = Callable[[discord.Message], Awaitable[None]]

# Measured bots, in the order of the first round (later rounds rotate it).
BARE = "bare_with_history"
BARE_NO_HISTORY = "bare_no_history"
PIPELINE = "pipeline"
PIPELINE_NO_HISTORY = "pipeline_no_history"
VARIANTS = (BARE, PIPELINE, BARE_NO_HISTORY, PIPELINE_NO_HISTORY)
LABELS = {
    BARE: "bare bot, with history",
    BARE_NO_HISTORY: "bare bot, no history",
    PIPELINE: "pipeline",
    PIPELINE_NO_HISTORY: "pipeline, history off",
}


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


async def round_trips(dc: DiscordEmulator, n: int, *, warmup: int = WARMUP) -> tuple[list[float], float]:
    """Seconds per sequential round trip (user mention in #general -> the bot's reply recorded),
    and the process CPU seconds the measured ones took (bot, emulators and SQLite's thread)."""
    channel = dc.channels["general"]
    latencies: list[float] = []
    cpu_started = 0.0
    for i in range(warmup + n):
        if i == warmup:
            cpu_started = time.process_time()
        replies = len(dc.sent_messages(channel))
        started = time.perf_counter()
        await dc.send_user_message(channel, "normal", "hello", mentions_bot=True)
        await dc.wait_for_bot_message(channel, count=replies + 1, timeout=ROUND_TRIP_TIMEOUT)
        if i >= warmup:
            latencies.append(time.perf_counter() - started)
    return latencies, time.process_time() - cpu_started


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


# --- the bots ---------------------------------------------------------------------------------


def bench_config(dc: DiscordEmulator, gm: GeminiEmulator, data_dir: Path, **overrides: str) -> Config:
    """The bot's settings against these emulators; the bare bots take model, persona and bound from it."""
    settings = {
        **bot_settings(dc, gm),
        "DATA_DIR": str(data_dir),
        "HTTP_PORT": "0",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        # one user sends every message: the cooldown is not what is measured here
        "USER_RATE_LIMIT_PER_MINUTE": "10000",
        "GUILD_RATE_LIMIT_PER_MINUTE": "100000",
        # A round trip ends when the reply is recorded: an answer sent whole, as the bare bots send
        # theirs (a streamed one is posted at its first words: bench/bench_streaming.py).
        "STREAMING": "false",
        **overrides,
    }
    return load_config(settings, env_file=None)


def bare_bot(config: Config, gemini: genai.Client, *, history: bool) -> tuple[commands.Bot, OnMessage]:
    """A naive discord.py + google-genai chat bot, with or without per-channel memory and persona."""
    intents = discord.Intents.default()
    intents.message_content = True
    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=intents, guild_ready_timeout=0.05)
    memory: dict[int, list[types.ContentDict]] = {}
    bound = config.history_max_messages
    gen_config: types.GenerateContentConfigDict = {"system_instruction": config.bot_persona}

    async def on_message(message: discord.Message) -> None:
        me = bot.user
        if message.author.bot or me is None or me not in message.mentions:
            return
        prompt = message.content.replace(me.mention, "").strip()
        if not history:
            answer = await gemini.aio.models.generate_content(model=config.gemini_model, contents=prompt)
            await message.reply(answer.text or "(no answer)", allowed_mentions=discord.AllowedMentions.none())
            return
        past = memory.setdefault(message.channel.id, [])
        asked: types.ContentDict = {"role": "user", "parts": [{"text": prompt}]}
        answer = await gemini.aio.models.generate_content(
            model=config.gemini_model, contents=[*past, asked], config=gen_config
        )
        text = answer.text or "(no answer)"
        past += [asked, {"role": "model", "parts": [{"text": text}]}]
        del past[: max(0, len(past) - bound)]
        await message.reply(text, allowed_mentions=discord.AllowedMentions.none())

    bot.add_listener(on_message)
    return bot, on_message


async def measure_bare(n: int, *, history: bool, warmup: int = WARMUP) -> dict[str, Any]:
    """Round-trip seconds and the not-for-the-bot cost of a bare bot (see ``bare_bot``)."""
    async with _emulators() as (dc, gm):
        with tempfile.TemporaryDirectory(prefix="bench-bare-") as data_dir:
            config = bench_config(dc, gm, Path(data_dir))
        gemini = genai.Client(api_key=gm.api_key, http_options=types.HttpOptions(
            base_url=gm.base_url, timeout=10_000, retry_options=types.HttpRetryOptions(attempts=1)))
        bot, on_message = bare_bot(config, gemini, history=history)
        try:
            with _discord_pointed_at(dc):
                async with _connected(bot, dc):
                    latencies, cpu = await round_trips(dc, n, warmup=warmup)
                    not_for_bot = await fast_exit_us(on_message, stranger_message(bot, dc))
        finally:
            await gemini.aio.aclose()
    return {"latencies": latencies, "cpu_s": cpu, "not_for_bot_us": not_for_bot}


async def measure_pipeline(n: int, *, warmup: int = WARMUP, **overrides: str) -> dict[str, Any]:
    """Round-trip seconds and the not-for-the-bot cost of the real bot (``build_application``, ``GeminiBot``).

    ``overrides`` are extra settings by variable name (e.g. ``HISTORY_MAX_MESSAGES="0"``).
    """
    async with _emulators() as (dc, gm):
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as data_dir:
            app = build_application(bench_config(dc, gm, Path(data_dir), **overrides))
            bot = GeminiBot(app, guild_ready_timeout=0.05)
            with _discord_pointed_at(dc):
                async with _connected(bot, dc):
                    latencies, cpu = await round_trips(dc, n, warmup=warmup)
                    not_for_bot = await fast_exit_us(bot.on_message, stranger_message(bot, dc))
    return {"latencies": latencies, "cpu_s": cpu, "not_for_bot_us": not_for_bot}


def _measurer(variant: str) -> Callable[[int], Awaitable[dict[str, Any]]]:
    if variant == BARE:
        return lambda n: measure_bare(n, history=True)
    if variant == BARE_NO_HISTORY:
        return lambda n: measure_bare(n, history=False)
    if variant == PIPELINE:
        return lambda n: measure_pipeline(n)
    return lambda n: measure_pipeline(n, HISTORY_MAX_MESSAGES="0")


# --- running ---------------------------------------------------------------------------------


async def _measure(n: int, rounds: int) -> dict[str, Any]:
    """Every variant, ``n`` round trips each, in ``rounds`` interleaved rounds."""
    rounds = max(1, min(rounds, n))
    latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, float] = {v: 0.0 for v in VARIANTS}
    not_for_bot: dict[str, list[float]] = {v: [] for v in VARIANTS}
    round_means: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        share = n // rounds + (1 if r < n % rounds else 0)
        for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
            result = await _measurer(variant)(share)
            latencies[variant] += result["latencies"]
            round_means[variant].append(statistics.mean(result["latencies"]) * 1000)
            cpu[variant] += result["cpu_s"]
            not_for_bot[variant].append(result["not_for_bot_us"])
    figures: dict[str, Any] = {"n": n, "rounds": rounds, "warmup_per_round": WARMUP}
    for variant in VARIANTS:
        figures[variant] = {
            "round_trip": _stats(latencies[variant]),
            "cpu_ms_per_round_trip": cpu[variant] / n * 1000,
            "not_for_bot_us": statistics.median(not_for_bot[variant]),
            "round_means_ms": round_means[variant],
        }
    return figures


def _added(figures: dict[str, Any], variant: str, against: str) -> dict[str, float]:
    """What ``variant`` adds to ``against``'s round trip: mean (ms, %), p50 (%), and the median over
    rounds of each round's mean ratio (the two ran minutes apart at most, so a busy spell on a
    shared machine, which inflates one round, moves it least)."""
    ours, theirs = figures[variant]["round_trip"], figures[against]["round_trip"]
    per_round = [
        (a - b) / b * 100
        for a, b in zip(figures[variant]["round_means_ms"], figures[against]["round_means_ms"], strict=True)
    ]
    return {
        "ms": ours["mean_ms"] - theirs["mean_ms"],
        "percent": (ours["mean_ms"] - theirs["mean_ms"]) / theirs["mean_ms"] * 100,
        "p50_percent": (ours["p50_ms"] - theirs["p50_ms"]) / theirs["p50_ms"] * 100,
        "median_round_percent": statistics.median(per_round),
    }


def _configure_logging() -> None:
    """INFO-level JSON logging into a discarding stream: the bots pay for their logs, nobody reads them."""
    from services.logging import configure_logging

    configure_logging(level="INFO", fmt="json", stream=_Discard())  # type: ignore[arg-type]


def run(quick: bool = False, n: int | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Measure the four bots in a fresh event loop; return the figures plus a ``summary`` table."""
    _configure_logging()
    n = n if n is not None else (QUICK_N if quick else DEFAULT_N)
    rounds = rounds if rounds is not None else (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    figures = asyncio.run(_measure(n, rounds))
    figures["added"] = {
        "pipeline_vs_bare_with_history": _added(figures, PIPELINE, BARE),
        "pipeline_vs_bare_no_history": _added(figures, PIPELINE, BARE_NO_HISTORY),
        "pipeline_history_off_vs_bare_no_history": _added(figures, PIPELINE_NO_HISTORY, BARE_NO_HISTORY),
    }
    added = figures["added"]["pipeline_vs_bare_with_history"]
    figures["targets"] = {
        "added_percent_max": ADDED_TARGET_PERCENT,
        "added_met": added["percent"] <= ADDED_TARGET_PERCENT,
        "not_for_bot_us_max": FAST_EXIT_TARGET_US,
        "not_for_bot_met": figures[PIPELINE]["not_for_bot_us"] < FAST_EXIT_TARGET_US,
    }
    rows = []
    for variant, against in ((PIPELINE, BARE), (PIPELINE_NO_HISTORY, BARE_NO_HISTORY),
                             (BARE, None), (BARE_NO_HISTORY, None)):
        trip = figures[variant]["round_trip"]
        for key, label in (("mean_ms", "mean"), ("p50_ms", "p50"), ("p95_ms", "p95")):
            base = figures[against]["round_trip"][key] if against else ""
            rows.append(_row(f"round trip {label}, {LABELS[variant]}", trip[key], "ms", "", base))
    bare_mean = figures[BARE]["round_trip"]["mean_ms"]
    rows.append(_row("pipeline added per message vs bare bot with history (mean)", added["ms"], "ms", "",
                     bare_mean))
    rows.append(_row("pipeline added vs bare bot with history (mean)", added["percent"], "%",
                     f"<= {ADDED_TARGET_PERCENT:g}", ""))
    rows.append(_row("pipeline added vs bare bot with history (p50, info)", added["p50_percent"], "%",
                     "", ""))
    rows.append(_row("pipeline added vs bare bot with history (median of per-round means, info)",
                     added["median_round_percent"], "%", "", ""))
    for key, label in (("pipeline_vs_bare_no_history", "pipeline added vs bare bot, no history (info)"),
                       ("pipeline_history_off_vs_bare_no_history",
                        "pipeline, history off, added vs bare bot, no history (info)")):
        other = figures["added"][key]
        rows.append(_row(f"{label}", other["ms"], "ms", "", f"{other['percent']:.0f}%"))
    for variant, against in ((PIPELINE, BARE), (PIPELINE_NO_HISTORY, BARE_NO_HISTORY)):
        rows.append(_row(f"process CPU per round trip, {LABELS[variant]} (info)",
                         figures[variant]["cpu_ms_per_round_trip"], "ms", "",
                         figures[against]["cpu_ms_per_round_trip"]))
    rows.append(_row("message not for the bot", figures[PIPELINE]["not_for_bot_us"], "us/message",
                     f"< {FAST_EXIT_TARGET_US:g}", figures[BARE]["not_for_bot_us"]))
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
    parser.add_argument("--rounds", type=int,
                        help=f"interleaved rounds (default {DEFAULT_ROUNDS}, {QUICK_ROUNDS} with --quick)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    started = time.perf_counter()
    result = run(quick=args.quick, n=args.n, rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
        return 0
    rows: list[list[str]] = [["figure", "value", "unit", "target", "baseline"]]
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
    verdict = "met" if result["targets"]["added_met"] else "NOT met"
    sys.stdout.flush()
    print(f"baseline: the bare bot's figure for the same row (pipeline rows: the bare bot with the same "
          f"history setting); 25% target {verdict}", file=sys.stderr)
    print(f"({time.perf_counter() - started:.1f}s, {result['n']} round trips per bot in {result['rounds']} "
          f"interleaved rounds, each after {WARMUP} warm-up)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
