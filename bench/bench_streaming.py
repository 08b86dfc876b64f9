"""Time to first visible text: a streamed answer against the same answer sent whole.

``python -m bench.bench_streaming [--quick] [--json] [--n N] [--tokens-per-second T]``.

Set-up (one process, one event loop, like ``bench_pipeline``): the Discord and Gemini emulators and
the real bot (``build_application`` + ``GeminiBot``) over loopback, the sandbox Gemini writing at
``tokens_per_second`` (default 200, the pace of a fast model; the bot's own
``GEMINI_TOKENS_PER_SECOND`` default, the slowest it waits for, is 100). Each measured question asks
for a 2,000-character answer (500 tokens: 2.5 s of writing at 200 tokens/s). The two bots, one with
``STREAMING=true``, one with ``STREAMING=false``, are measured in turns (alternating, each on fresh
emulators after one unmeasured question), ``n`` questions each, one at a time:

- first visible text: from the user's message to the first message of the answer on Discord (the
  emulator's record of its creation): the first 40-character chunk when streamed, the whole answer
  when not;
- whole answer: from the user's message to the moment Discord shows all of it (for the streamed
  bot, the arrival of its final edit, which waits its turn under the edit pace: one edit a second
  per message).

The figure is the ratio of the means, unstreamed / streamed, for the first visible text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_pipeline import _configure_logging, _connected, _discord_pointed_at, _emulators, bench_config
from bot import marks
from bot.app import build_application
from bot.client import GeminiBot
from sandbox.discord_emu import DiscordEmulator

DEFAULT_N = 3
QUICK_N = 1
TOKENS_PER_SECOND = 200.0
QUESTION = "reply with 2000 characters"
ANSWER_TIMEOUT = 30.0


def _written(dc: DiscordEmulator, channel: int, question: int) -> bool:
    """Every message of the answer to ``question`` carries its final mark, in order."""
    indices = []
    for m in dc.sent_messages(channel):
        mark = marks.read(m.content)
        if mark is not None and mark[0] == question and not m.deleted:
            indices.append(mark[1])
    return bool(indices) and indices == list(range(len(indices)))


def _shown_at(dc: DiscordEmulator, channel: int, question: int) -> tuple[float, float]:
    """(creation of the answer's first message, arrival of its last write) on the emulator's clock."""
    mine = [m for m in dc.sent_messages(channel) if (marks.read(m.content) or (0, 0))[0] == question]
    paths = {f"/api/v10/channels/{channel}/messages/{m.id}" for m in mine}
    edits = [r.time for r in dc.requests if r.route == "edit" and r.path in paths and r.status == 200]
    first = min(m.at for m in mine)
    return first, max([*edits, *(m.at for m in mine)])


async def _measure(streaming: bool, n: int, tokens_per_second: float) -> dict[str, list[float]]:
    """Seconds to the first visible text and to the whole answer, for ``n`` questions."""
    figures: dict[str, list[float]] = {"first_visible": [], "whole": []}
    async with _emulators() as (dc, gm):
        gm.tokens_per_second = tokens_per_second
        with tempfile.TemporaryDirectory(prefix="bench-streaming-") as data_dir:
            config = bench_config(
                dc,
                gm,
                Path(data_dir),
                STREAMING="true" if streaming else "false",
                GEMINI_TIMEOUT_SECONDS="60",
                PROCESSING_TIMEOUT_SECONDS="60",
            )
            bot = GeminiBot(build_application(config), guild_ready_timeout=0.05, check_models=False)
            with _discord_pointed_at(dc):
                async with _connected(bot, dc):
                    channel = dc.channels["general"]
                    # Unmeasured: the first request pays for the SDK's session and the first SQLite writes.
                    warm = await dc.send_user_message(channel, "normal", "hello", mentions_bot=True)
                    await dc.wait_until(lambda q=int(warm["id"]): _written(dc, channel, q), ANSWER_TIMEOUT)  # type: ignore[misc]
                    for _ in range(n):
                        asked = time.monotonic()
                        question = await dc.send_user_message(channel, "normal", QUESTION, mentions_bot=True)
                        qid = int(question["id"])
                        await dc.wait_until(lambda q=qid: _written(dc, channel, q), ANSWER_TIMEOUT)  # type: ignore[misc]
                        await asyncio.sleep(0.2)  # the last edit's record
                        first, last = _shown_at(dc, channel, qid)
                        figures["first_visible"].append(first - asked)
                        figures["whole"].append(last - asked)
    return figures


async def _run(n: int, tokens_per_second: float) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {"streamed": {}, "whole": {}}
    for i in range(n):  # alternate, one question each, so a busy spell slows both alike
        for name, streaming in (
            (("streamed", True), ("whole", False)) if i % 2 == 0 else (("whole", False), ("streamed", True))
        ):
            got = await _measure(streaming, 1, tokens_per_second)
            for key, values in got.items():
                results[name].setdefault(key, []).extend(values)
    return {
        name: {
            key: {"mean_s": statistics.mean(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
            for key, v in figures.items()
        }
        for name, figures in results.items()
    }


def run(
    quick: bool = False, n: int | None = None, tokens_per_second: float = TOKENS_PER_SECOND
) -> dict[str, Any]:
    """Measure both bots; return the figures plus a ``summary`` table."""
    _configure_logging()
    n = n if n is not None else (QUICK_N if quick else DEFAULT_N)
    figures = asyncio.run(_run(n, tokens_per_second))
    streamed, whole = figures["streamed"], figures["whole"]
    ratio = whole["first_visible"]["mean_s"] / streamed["first_visible"]["mean_s"]
    figures["ratio_first_visible"] = ratio
    figures["settings"] = {"tokens_per_second": tokens_per_second, "question": QUESTION, "n": n}
    pace = f"{QUESTION!r}, sandbox Gemini at {tokens_per_second:g} tokens/s"
    figures["summary"] = [
        _row(
            f"first visible text, streamed (mean; {pace})",
            streamed["first_visible"]["mean_s"] * 1000,
            "ms",
            whole["first_visible"]["mean_s"] * 1000,
        ),
        _row("first visible text, sent whole / streamed", ratio, "x", ""),
        _row(
            "whole answer shown, streamed (mean)",
            streamed["whole"]["mean_s"] * 1000,
            "ms",
            whole["whole"]["mean_s"] * 1000,
        ),
    ]
    return figures


def _row(figure: str, value: float, unit: str, baseline: float | str) -> dict[str, Any]:
    """A summary row; the baseline is the same figure for the answer sent whole."""
    if isinstance(baseline, float):
        baseline = round(baseline, 1)
    return {"figure": figure, "value": round(value, 1), "unit": unit, "target": "", "baseline": baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_streaming", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_N} question per bot instead of {DEFAULT_N}"
    )
    parser.add_argument("--n", type=int, help="questions per bot")
    parser.add_argument(
        "--tokens-per-second", type=float, default=TOKENS_PER_SECOND, help="the sandbox Gemini's writing pace"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")
    result = run(quick=args.quick, n=args.n, tokens_per_second=args.tokens_per_second)
    if args.json:
        print(json.dumps(result))
        return 0
    for row in result["summary"]:
        print(
            f"{row['figure']}: {row['value']} {row['unit']}"
            + (f" (sent whole: {row['baseline']} {row['unit']})" if row["baseline"] != "" else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
