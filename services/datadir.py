"""The data directory: created private (mode 0700) and used by one process at a time.

``DataDirLock`` holds an exclusive ``flock`` on ``<data_dir>/.bot.lock`` and writes its pid
there. The running bot takes it when its DataStore service starts and drops it when that
service stops; the offline ``python -m bot datastore`` tool takes it for as long as it runs.
So a second bot on the same directory, or an offline recovery while the bot runs, is refused
with the holder's pid instead of two processes rewriting the same files. The kernel drops
the lock when its holder exits, ``kill -9`` included: a stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".bot.lock"
PRIVATE_DIR_MODE = 0o700
_PID_BYTES = 32


class DataDirLockedError(Exception):
    """Another process holds the data directory's lock; ``pid`` is its process id, if known."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        super().__init__(
            f"DATA_DIR {directory} is in use by {describe_holder(pid)} (a running bot or an offline "
            "datastore command): stop that process first, or give this one its own DATA_DIR."
        )


def describe_holder(pid: int | None) -> str:
    """``process 1234``, or words saying the pid is not known."""
    return f"process {pid}" if pid is not None else "another process (pid not recorded yet)"


def make_private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents; ``path`` itself gets mode 0700.

    An existing directory is left as it is (``load_config`` warns when it is open to others).
    """
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


class DataDirLock:
    """An exclusive, non-blocking lock on a data directory, held until ``release()``.

    ``acquire()`` creates the directory (mode 0700) when it is missing. It raises
    ``DataDirLockedError`` when another process (or another ``DataDirLock`` on the same
    directory in this process) holds the lock, and ``OSError`` when the directory cannot be
    created. Both methods are idempotent. Usable as a context manager.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        make_private_dir(self.directory)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLockedError(self.directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Erase our pid while still holding the lock: afterwards it may be the next holder's.
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote, or None (not written yet, or not a number)."""
    try:
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() else None
