"""The data directory's lock (services/datadir.py) held by a real other process, and what it
refuses: a second DataStoreService, the offline ``python -m bot datastore`` tool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.datadir import LOCK_FILE, DataDirLock, DataDirLockedError
from services.datastore import DataStore, DataStoreService

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, says so, and holds it until its stdin closes (or it is killed).
HOLDER = """
import sys
from pathlib import Path
from services.datadir import DataDirLock
lock = DataDirLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""

Holder = Callable[[Path], subprocess.Popen[str]]


@pytest.fixture
def hold_lock() -> Iterator[Holder]:
    """``hold_lock(dir)``: a child process that holds ``dir``'s lock until the test ends."""
    children: list[subprocess.Popen[str]] = []

    def start(directory: Path) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(directory)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline()  # returns "" at once if the child dies instead
        assert line == "locked\n", f"the lock holder did not start (exit {child.poll()})"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


def test_a_second_process_is_refused_with_the_directory_and_the_holders_pid(
    tmp_path: Path, hold_lock: Holder
) -> None:
    data = tmp_path / "data"
    holder = hold_lock(data)
    with pytest.raises(DataDirLockedError) as info:
        DataDirLock(data).acquire()
    assert info.value.pid == holder.pid and info.value.directory == data
    assert f"DATA_DIR {data} is in use by process {holder.pid}" in str(info.value)
    assert (data / LOCK_FILE).read_text() == f"{holder.pid}\n"


def test_the_kernel_frees_the_lock_when_its_holder_is_killed(tmp_path: Path, hold_lock: Holder) -> None:
    """kill -9 leaves the lock file behind, but never a lock: the next start takes it."""
    data = tmp_path / "data"
    holder = hold_lock(data)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with DataDirLock(data) as lock:
        assert lock.held
        assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert (data / LOCK_FILE).read_text() == ""  # released: no pid left to mislead anyone


def test_the_lock_creates_a_missing_directory_private_and_is_idempotent(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    old_umask = os.umask(0o022)
    try:
        lock = DataDirLock(data)
        lock.acquire()
        lock.acquire()
    finally:
        os.umask(old_umask)
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(DataDirLockedError):  # a second lock in this process is refused too
        DataDirLock(data).acquire()
    lock.release()
    lock.release()
    DataDirLock(data).acquire()


async def test_a_second_datastore_service_on_the_same_directory_fails_to_start(
    tmp_path: Path, hold_lock: Holder
) -> None:
    """Another process holds DATA_DIR: start() raises naming it and loads (writes) nothing."""
    data = tmp_path / "data"
    holder = hold_lock(data)
    service = DataStoreService(DataStore(data))
    with pytest.raises(DataDirLockedError, match=f"in use by process {holder.pid}"):
        await service.start()
    assert sorted(p.name for p in data.iterdir()) == [LOCK_FILE]
    assert service.health()["ok"] is False


async def test_the_service_holds_the_directory_from_start_to_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DataStoreService(DataStore(data))
    await first.start()
    second = DataStoreService(DataStore(data))
    with pytest.raises(DataDirLockedError, match=f"in use by process {os.getpid()}"):
        await second.start()
    await first.stop()
    await second.start()
    assert second.health()["ok"] is True
    await second.stop()
    await second.stop()  # idempotent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "--env-file", os.devnull, "datastore", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("action", ["recover", "validate", "backups"])
def test_the_offline_tool_refuses_while_another_process_holds_the_directory(
    tmp_path: Path, hold_lock: Holder, action: str
) -> None:
    """Exit 3 with one sentence naming the directory, the pid and the online way; nothing touched."""
    data = tmp_path / "data"
    store = DataStore(data)
    store.save("admins", {"user_ids": [1]})
    store.save("admins", {"user_ids": [1, 2]})
    (data / "admins.json").write_text("{broken")
    holder = hold_lock(data)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    done = run_cli(action, "--data-dir", str(data), cwd=tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"DATA_DIR {data} is in use by process {holder.pid}, a running bot")
    assert "recover online" in line and "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before
    assert not (data / "quarantine").exists()


def test_the_offline_tool_takes_the_lock_while_it_works_and_does_not_create_a_missing_dir_to_read(
    tmp_path: Path,
) -> None:
    """recover works (and frees the lock after); validate of an absent directory creates nothing."""
    data = tmp_path / "data"
    done = run_cli("validate", "--data-dir", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not data.exists()
    done = run_cli("recover", "--data-dir", str(data), cwd=tmp_path)
    assert done.returncode == 2, done.stderr  # a fresh store: only the defaults
    assert data.stat().st_mode & 0o077 == 0
    DataDirLock(data).acquire()  # released on exit


def test_the_offline_tool_says_in_one_sentence_when_the_data_dir_is_not_a_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = run_cli("recover", "--data-dir", str(blocker), cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"cannot use DATA_DIR {blocker} (") and "--data-dir" in line
