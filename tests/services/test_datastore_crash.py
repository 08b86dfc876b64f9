"""Crash safety with real processes: SIGKILL a saving child at random moments, over and over."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

from tests.services._datastore_child import quiet_store, save_forever

KILLS = 100
TIME_LIMIT = 22.0  # seconds; the loop stops here even if it has not reached KILLS


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _temps(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*.tmp")]


def test_sigkill_during_saves_never_loses_a_committed_value_nor_leaves_a_torn_file(tmp_path: Path) -> None:
    """After each of 100 SIGKILLs the counter loads from the file itself (never torn, never
    quarantined), is valid, holds at least the last value the child reported committed and at
    most the one save that was in flight; temp files of the dead writer are cleaned up."""
    data_dir = tmp_path / "data"
    quiet_store(data_dir).load("counter")  # first start: the defaults become the file
    ctx = multiprocessing.get_context("fork")  # a fork per cycle costs milliseconds, not an interpreter start
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    last_reported = 0
    kills = mid_write = in_flight_visible = 0
    started = time.monotonic()
    while kills < KILLS and time.monotonic() - started < TIME_LIMIT:
        read_fd, write_fd = os.pipe()
        child = ctx.Process(target=save_forever, args=(str(data_dir), write_fd), daemon=True)
        child.start()
        os.close(write_fd)
        try:
            # Mostly short lives (kills land in every phase of a save); every tenth child lives
            # long enough to commit several saves even on a slow, busy disk.
            time.sleep(0.05 if kills % 10 == 9 else rng.uniform(0.0, 0.03))
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(5)
            assert child.exitcode == -signal.SIGKILL, f"seed {seed}: child ended by itself ({child.exitcode})"
            reports = _read_all(read_fd).decode().split()
        finally:
            os.close(read_fd)
        kills += 1
        values = [int(tok) for tok in reports if tok.isdecimal()]
        assert values == list(range(last_reported + 1, last_reported + 1 + len(values))), f"seed {seed}"
        last_reported = values[-1] if values else last_reported
        mid_write += bool(_temps(data_dir))

        store = quiet_store(data_dir)
        state = store.load("counter")
        status = store.status()["counter"]
        assert status.source == "file", f"seed {seed}, kill {kills}: {status}"
        assert store.check("counter", state) == []
        assert last_reported <= state["n"] <= last_reported + 1, f"seed {seed}: {state} vs {last_reported}"
        in_flight_visible += state["n"] == last_reported + 1
        # The child always resumes from what is on disk, so what it reports next continues from here.
        last_reported = state["n"]
        assert not _temps(data_dir), f"seed {seed}: the dead writer's temp files were not cleaned up"
        assert not (data_dir / "quarantine").exists()

    elapsed = time.monotonic() - started
    print(
        f"\n{kills} SIGKILLs in {elapsed:.1f}s (seed {seed}); {last_reported} saves committed; "
        f"{mid_write} kills left a temp file behind (killed mid-write); "
        f"{in_flight_visible} kills landed after the commit point but before the report"
    )
    assert kills >= KILLS, f"only {kills} kills within {TIME_LIMIT}s"
    assert last_reported > 0 and mid_write > 0, "no kill ever landed during a write: the test proved nothing"
    assert len(quiet_store(data_dir).list_backups("counter")) <= 3
