"""Child process for the DataStore crash test: saves a growing counter until it is killed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

from services.datastore import DataStore, FileSpec


def expected_pad(n: int) -> str:
    """The padding saved with counter ``n``: its size varies so a torn write would show."""
    return "x" * ((n * 7919) % 20_000)


def validate_counter(data: Any) -> list[str]:
    """``{"n": int >= 0, "pad": str}``, and the pad must match ``n``."""
    if not isinstance(data, dict) or set(data) != {"n", "pad"}:
        return ["expected exactly the keys n and pad"]
    n, pad = data["n"], data["pad"]
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        return ["n: expected an int >= 0"]
    if pad != expected_pad(n):
        return ["pad does not belong to n"]
    return []


COUNTER = FileSpec("counter", lambda: {"n": 0, "pad": ""}, validate_counter)


def quiet_store(data_dir: Path) -> DataStore:
    """A store holding only the counter, logging nowhere (the test checks state, not log lines)."""
    quiet = structlog.wrap_logger(structlog.ReturnLogger())
    return DataStore(data_dir, [COUNTER], keep_backups=3, logger=quiet)


def save_forever(data_dir: str, report_fd: int) -> None:
    """Save n+1, n+2, ... and report ``committed N`` on ``report_fd`` only after each save returns."""
    store = quiet_store(Path(data_dir))
    n = store.load("counter")["n"]
    while True:
        n += 1
        store.save("counter", {"n": n, "pad": expected_pad(n)})
        os.write(report_fd, f"committed {n}\n".encode())
