"""A real PostgreSQL server for the tests: started once per test session (per xdist worker), in a
temp dir, on a free loopback port, with a fresh database for each test that asks for one.

The server is Debian's PostgreSQL (``initdb`` and ``pg_ctl`` live in its versioned bin directory,
``/usr/lib/postgresql/<version>/bin``, not on PATH); ``PG_BIN`` names another directory. When no
binaries are found, every test that needs the server fails with one sentence saying what to install:
these tests must run in CI, never be skipped.

PostgreSQL refuses to run as root; when the tests run as root (CI containers) the server runs as the
``postgres`` user that Debian's package creates, in a directory handed to it.

Fixtures:

- ``pg_server`` (session): the running server. ``new_database()`` makes a database (migrated to
  the bot's schema, or empty with ``migrated=False``) and returns its URL; ``reset()`` empties the
  worker's shared test database. Both work from any thread, with or without an event loop.
- ``pg_url``: the URL of a database at the bot's schema holding no rows, for this test alone: the
  worker's one test database, emptied (its tables truncated, its identities restarted, every other
  connection to it ended) before the test. Much faster than a new database per test; a test that
  changes the schema itself (a migration test, the crash test's audit trigger) takes
  ``new_database()`` instead, and a database found changed anyway is made again from the template.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from services.pg_storage import PostgresStore

T = TypeVar("T")

MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or PG_BIN: "
    "install them (apt-get install postgresql-15) or set PG_BIN to their directory; the storage tests "
    "run against a real PostgreSQL and are never skipped"
)
USER = "bot"
ROOT_PREFIX = "bot-pg-"  # then the pid of the test process that started the server
TEMPLATE = "bot_template"
SHARED = "bot_test"


def find_bin_dir() -> Path | None:
    """The directory with ``initdb`` and ``pg_ctl``: ``PG_BIN``, the newest Debian one, or PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, on 127.0.0.1:``port``, trusting local connections."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._as: list[str] = []
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: asyncpg.Connection | None = None
        self._conns: dict[str, asyncpg.Connection] = {}
        self._template_ready = False
        self._shared_shape: tuple[Any, ...] | None = None
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "the tests run as root and there is no 'postgres' user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)"
                ) from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )

    def start(self) -> None:
        result = self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust",
            "-E", "UTF8", "--no-locale", "--no-sync",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()[-500:]}")
        for _ in range(5):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                "-c shared_buffers=32MB -c max_connections=300"
            )
            if not self.durable:
                # Durability against the OS crashing is not what the tests check (a killed client
                # is): no fsync keeps a test's CREATE DATABASE and migrations fast. Benchmarks
                # measure the real thing (durable=True).
                options += " -c fsync=off -c full_page_writes=off"
            result = self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                "-t", "30", "-o", options, "start",
            )
            if result.returncode == 0:
                return
        raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text()[-1000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self.close()
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    # -- databases (through asyncpg on a thread of its own: callers may or may not run a loop) --

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="pg-admin", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    async def _admin(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.url())
        return self._conn

    def new_database(self, *, migrated: bool = True) -> str:
        """A database of its own (at the bot's schema, or empty) and its URL."""
        return self._call(self._new_database(migrated))

    async def _new_database(self, migrated: bool) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        admin = await self._admin()
        if migrated and not self._template_ready:
            await admin.execute(f"CREATE DATABASE {TEMPLATE} TEMPLATE template0")
            await _migrate(self.url(TEMPLATE))
            self._template_ready = True
        template = TEMPLATE if migrated else "template0"
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)

    def reset(self) -> str:
        """The worker's shared test database with no rows (see the module docstring) and its URL."""
        return self._call(self._reset())

    async def _reset(self) -> str:
        admin = await self._admin()
        if self._shared_shape is not None:
            conn = await asyncpg.connect(self.url(SHARED))
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                if await _shape(conn) == self._shared_shape:
                    tables = await conn.fetchval(
                        "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables "
                        "WHERE schemaname = 'public' AND tablename <> 'schema_version'"
                    )
                    await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY")
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                    return self.url(SHARED)
            finally:
                await conn.close()
            await admin.execute(f"DROP DATABASE {SHARED} WITH (FORCE)")  # a test changed its schema
        await self._new_database(True)  # the template
        await admin.execute(f"CREATE DATABASE {SHARED} TEMPLATE {TEMPLATE}")
        conn = await asyncpg.connect(self.url(SHARED))
        try:
            self._shared_shape = await _shape(conn)
        finally:
            await conn.close()
        return self.url(SHARED)

    def execute(self, url: str, sql: str) -> None:
        """Run ``sql`` (several statements allowed) in the database at ``url``."""
        self._call(self._execute(url, sql))

    async def _execute(self, url: str, sql: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def fetch(self, url: str, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` in the database at ``url`` (committed at once; from any thread)."""
        return self._call(self._fetch(url, sql))

    async def _fetch(self, url: str, sql: str) -> list[tuple[Any, ...]]:
        for attempt in (1, 2):
            conn = self._conns.get(url)
            if conn is None or conn.is_closed():
                conn = self._conns[url] = await asyncpg.connect(url)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError):
                self._conns.pop(url, None)  # ended by a reset(): connect again, once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                self._call(conn.close())
        self._conns.clear()
        loop, self._loop = self._loop, None
        if loop is None:
            return
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(conn.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql (no event loop needed); its output, or RuntimeError."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-d", self.url(database), "-c", sql],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout


async def _migrate(url: str) -> None:
    """Bring the database at ``url`` to the bot's schema with the bot's own migrations."""
    async with PostgresStore(url, register=False):
        pass


async def _shape(conn: asyncpg.Connection) -> tuple[Any, ...]:
    """What a test could change about a database's schema: tables, functions, triggers, versions."""
    row = await conn.fetchrow(
        "SELECT (SELECT array_agg(tablename ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'), "
        "(SELECT array_agg(proname ORDER BY proname) FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = 'public'), "
        "(SELECT array_agg(tgname ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal), "
        "(SELECT array_agg(version ORDER BY version) FROM schema_version)"
    )
    return tuple(tuple(v or ()) for v in row)


_server: PostgresServer | None = None
_server_error: str | None = None


@contextlib.contextmanager
def durable_server() -> Iterator[PostgresServer | None]:
    """A throwaway server with PostgreSQL's durable defaults (fsync, synchronous commit) for the
    benchmarks, stopped afterwards; None when the binaries are missing."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        yield None
        return
    server = PostgresServer(bin_dir, durable=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def stop_abandoned(bin_dir: Path) -> None:
    """Stop the servers of test processes that died without stopping them (a killed run), and
    delete their directories: pg_ctl starts the server as a daemon, so it outlives a SIGKILL."""
    for root in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*-*"):
        try:
            owner = int(root.name[len(ROOT_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(owner, 0)
            continue  # still running (another xdist worker, another session)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*runner, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
            capture_output=True, timeout=30, check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


def server() -> PostgresServer:
    """The session's server, started on first use; ``pytest.fail`` with one sentence if it cannot be."""
    global _server, _server_error
    if _server is None and _server_error is None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            _server_error = MISSING
        else:
            stop_abandoned(bin_dir)
            candidate = PostgresServer(bin_dir)
            try:
                candidate.start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                candidate.stop()
                _server_error = f"the test PostgreSQL server did not start: {exc}"
            else:
                _server = candidate
    if _server is None:
        pytest.fail(_server_error or MISSING, pytrace=False)
    return _server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this test session (this xdist worker), stopped at its end."""
    yield server()
    global _server
    if _server is not None:
        with contextlib.suppress(Exception):
            _server.stop()
        _server = None


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """The URL of a database at the bot's schema with no rows, for this test alone."""
    return pg_server.reset()
