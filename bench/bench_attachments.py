"""Attachments benchmark: what a file costs the hot path.

``python -m bench.bench_attachments [--quick] [--json]``. Acceptance is what intake does for a
live message before it answers: ``bot.attachments.collect`` (the limits and the re-fetch plan,
no I/O) and ``accept_with_history`` (one SQLite transaction, ``synchronous=NORMAL`` as the bot
runs it) of the payload. It is measured for a text-only message and for one carrying a 1 MB
image, interleaved in the same run on the same database, so the difference is the image's added
cost: the bytes are not downloaded before acceptance, only their reference is stored. The spool
write of the 1 MB image (paid once, when the answer downloads it) is measured apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord

from bot.attachments import Spool, collect
from resilience.degradation import ItemKind, QueueCaps
from services.config import load_config
from services.storage import SqliteStore

IMAGE_BYTES = 1_000_000
CAPS = QueueCaps(max_items=1_000_000, max_pending_per_user=5, max_pending_per_guild=50)


class _State:
    http = None


def _message(i: int, with_image: bool) -> Any:
    attachments = []
    if with_image:
        data = {
            "id": 1_300_000_000_000_000_000 + i, "filename": "photo.png", "size": IMAGE_BYTES,
            "content_type": "image/png",
            "url": f"https://cdn.discordapp.com/attachments/1/{i}/photo.png?ex=65d903de&is=65c68ede&hm="
            + "ab" * 32 + "&",
            "proxy_url": "", "width": 1024, "height": 768,
        }
        attachments.append(discord.Attachment(data=data, state=_State()))  # type: ignore[arg-type]
    return SimpleNamespace(
        id=1_200_000_000_000_000_000 + i, channel=SimpleNamespace(id=1_100_000_000_000_000_000 + i),
        attachments=attachments, embeds=[], stickers=[], reference=None,
    )


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "n": len(samples)}


async def _acceptance(directory: Path, n: int) -> dict[str, Any]:
    config = load_config(environ={}, env_file=None)
    now = 1_700_000_000.0
    samples: dict[bool, list[float]] = {False: [], True: []}
    async with SqliteStore(directory / "accept.sqlite3", synchronous="NORMAL") as store:
        for i in range(2 * n):
            with_image = bool(i % 2)  # interleaved: both see the same database and machine load
            message = _message(i, with_image)
            started = time.perf_counter()
            files = collect(message, config)
            payload = {"message_id": message.id, "channel_id": message.channel.id, "guild_id": 7,
                       "author_id": 1_000 + i, "content": "what is in this picture?", **files.payload()}
            await store.accept_with_history(
                message.id, ItemKind.INBOUND, str(message.channel.id), payload,
                now=now, lease_seconds=60, caps=CAPS,
            )
            samples[with_image].append(time.perf_counter() - started)
    text, image = _percentiles(samples[False]), _percentiles(samples[True])
    added = {k: round(image[k] - text[k], 3) for k in ("p50_ms", "p99_ms")}
    return {"text_only": text, "with_1mb_image": image, "added": added}


def _spool(directory: Path, n: int) -> dict[str, Any]:
    spool = Spool(directory / "spool", max_bytes=64 * IMAGE_BYTES)
    data = bytes(IMAGE_BYTES)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        spool.put(str(1000 + i), data)
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def run(quick: bool = False) -> dict[str, Any]:
    """Run the measurements; ``summary`` holds the table rows."""
    n = 50 if quick else 500
    with tempfile.TemporaryDirectory(prefix="bench-attach-") as tmp:
        directory = Path(tmp)
        acceptance = asyncio.run(_acceptance(directory, n))
        spool = _spool(directory, 20 if quick else 100)
    result: dict[str, Any] = {"acceptance": acceptance, "spool_write_1mb": spool}
    text, image, added = acceptance["text_only"], acceptance["with_1mb_image"], acceptance["added"]
    result["summary"] = [
        {"figure": "acceptance with a 1 MB image, p50 / p99",
         "value": f"{image['p50_ms']} / {image['p99_ms']}",
         "unit": "ms", "target": "", "baseline": f"text only: {text['p50_ms']} / {text['p99_ms']}"},
        {"figure": "added by the image, p50 / p99", "value": f"{added['p50_ms']} / {added['p99_ms']}",
         "unit": "ms", "target": "", "baseline": "a reference only: no download before acceptance"},
        {"figure": "spool write of the 1 MB image, p50 / p99",
         "value": f"{spool['p50_ms']} / {spool['p99_ms']}", "unit": "ms", "target": "",
         "baseline": "paid when the answer downloads it, not at acceptance"},
    ]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_attachments", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result["summary"]:
            print(f"{row['figure']}: {row['value']} {row['unit']}  ({row['baseline']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
