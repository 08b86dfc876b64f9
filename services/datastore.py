"""The JSON DataStore: the bot's small state in files that survive crashes and corruption.

Each named file lives at ``<data_dir>/<name>.json``. A write is atomic (temp file in the same
directory, fsync, ``os.replace``, fsync of the directory) and keeps the previous good version
as ``<name>.json.bak`` and as a timestamped copy under ``<data_dir>/backups/`` (the last N
superseded versions, so "file, .bak, newest backup" runs newest to oldest). A file that is
missing, unreadable, larger than ``max_file_bytes`` (never read whole), not JSON or invalid is
moved to ``<data_dir>/quarantine/`` (the newest ``keep_quarantined`` per file are kept) and the
state comes back from the ``.bak``, then (in a running process's ``recover``) the state it last
committed, then the newest valid backup, then the defaults; the source that
served is logged, counted and reported through ``on_event``. Falling back to the defaults
because everything was corrupt is an alert, never silent.

``DataStore`` is synchronous (the files are small); ``DataStoreService`` runs it in a thread
for the asyncio bot and is what the service registry starts. The service holds the data
directory's lock (``services/datadir.py``) while it runs, so one process owns the directory.

With PostgreSQL (``DATABASE_URL``), several processes share this state: ``PgDataStore`` keeps each
document as a JSONB row with a version in the store's database (``shared_state``, the versions it
replaced in ``shared_state_history``), and tells the other processes of every change with a
notification, so an operator's maintenance or breaker opening reaches all of them at once. Both
kinds satisfy ``SharedState`` (what the bot reads without I/O) and ``SharedStateService`` (the
registry service the operations call).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from resilience.clock import Clock, SystemClock
from services.config import SAFETY_THRESHOLDS
from services.datadir import DataDirLock, make_private_dir

if TYPE_CHECKING:
    import asyncpg

    from services.pg_storage import PostgresStore

T = TypeVar("T")

SOURCE_FILE = "file"
SOURCE_BAK = "bak"
SOURCE_BACKUP = "backup"
SOURCE_MEMORY = "memory"  # the running process's last committed state (recover() only)
SOURCE_DEFAULTS = "defaults"

_STAMP_FORMAT = "%Y%m%dT%H%M%S.%f"
_STAMP_RE = r"(\d{8}T\d{6}\.\d{6})"

# The four files hold a few KiB; a file past this is damage (or an attack), not settings.
MAX_FILE_BYTES = 1024 * 1024
KEEP_QUARANTINED = 10


# --- errors -------------------------------------------------------------------------------


class DataStoreError(Exception):
    """Root of the DataStore's exceptions."""


class UnknownFileError(DataStoreError):
    """The name is not one of the store's files."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(f"unknown datastore file {name!r}; known: {', '.join(self.known)}")


class DataStoreValidationError(DataStoreError):
    """Data offered to ``save`` is invalid; nothing was written."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.name = name
        self.problems = list(problems)
        super().__init__(f"invalid data for {name!r}: " + "; ".join(self.problems))


# --- file specs and the bot's four files ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One named JSON file: its default content and a validator returning its problems."""

    name: str
    default: Callable[[], dict[str, Any]]
    validate: Callable[[Any], list[str]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


def _check_keys(
    obj: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()
) -> list[str]:
    """Problems with an object's shape: not a dict, missing keys, unknown keys."""
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    problems = [f"{where}: missing key {k!r}" for k in sorted(required - obj.keys())]
    problems += [f"{where}: unknown key {k!r}" for k in sorted(obj.keys() - required - optional, key=str)]
    return problems


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _check_optional(value: Any, where: str, ok: Callable[[Any], bool], expected: str) -> list[str]:
    if value is None or ok(value):
        return []
    return [f"{where}: expected {expected} or null, got {type(value).__name__}"]


def validate_maintenance(data: Any) -> list[str]:
    """``{"enabled": bool, "message": str|None, "since": float|None, "by": str|None}``."""
    problems = _check_keys(data, "maintenance", {"enabled", "message", "since", "by"})
    if problems and not isinstance(data, dict):
        return problems
    if "enabled" in data and not isinstance(data["enabled"], bool):
        problems.append(f"maintenance.enabled: expected bool, got {type(data['enabled']).__name__}")
    if "message" in data:
        problems += _check_optional(data["message"], "maintenance.message", _is_str, "str")
    if "since" in data:
        problems += _check_optional(data["since"], "maintenance.since", _is_number, "number")
    if "by" in data:
        problems += _check_optional(data["by"], "maintenance.by", _is_str, "str")
    return problems


_GUILD_KEYS = frozenset({"chat_channels", "persona", "user_rate_per_minute", "tools", "settings"})
GUILD_TOOLS = frozenset({"google_search", "url_context", "code_execution"})
"""The Google-run tools a guild may turn on (``tools``: name -> bool; bot/grounding.py)."""

MAX_PERSONA_CHARS = 4000
"""The longest persona a guild may set: what one Discord text input holds (the ``/settings persona``
modal; discord-api-docs, Text Input: ``max_length`` at most 4000)."""
MAX_MODEL_NAME_CHARS = 100


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _within(kind: Callable[[Any], bool], low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: kind(value) and low <= value <= high


# The per-guild settings (bot/settings.py), each with what a stored value must be. The bot checks
# more when one is set (an allowed model, a ceiling from the configuration) and says why in a
# sentence; these are the shapes a file must have to be read at all.
SCOPED_SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "persona": (lambda v: isinstance(v, str) and 0 < len(v) <= MAX_PERSONA_CHARS,
                f"a string of 1 to {MAX_PERSONA_CHARS} characters"),
    "model": (lambda v: isinstance(v, str) and 0 < len(v) <= MAX_MODEL_NAME_CHARS and not any(
        c.isspace() for c in v), "a model name"),
    "temperature": (_within(_is_number, 0, 2), "a number from 0 to 2"),
    "max_output_tokens": (_within(_is_int, 1, 1_000_000), "a whole number of tokens"),
    "safety": (lambda v: v in SAFETY_THRESHOLDS, f"one of {', '.join(SAFETY_THRESHOLDS)}"),
    "history": (_within(_is_int, 0, 1000), "a whole number of messages from 0 to 1000"),
    "grounding": (_is_bool, "true or false"),
    "streaming": (_is_bool, "true or false"),
    "auto_thread": (_is_bool, "true or false"),
    "functions": (lambda v: isinstance(v, list | tuple) and len(v) <= 32 and all(
        isinstance(n, str) and 0 < len(n) <= 64 for n in v), "a list of at most 32 function names"),
    "answer_cache": (_is_bool, "true or false"),
}
"""Settings a guild may set for itself and override per category, channel, forum or thread."""
SERVER_SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **SCOPED_SETTING_CHECKS,
    "modlog_channel": (lambda v: _is_int(v) and v > 0, "a channel id"),
    "modlog_text": (_is_bool, "true or false"),
    "memory": (_is_bool, "true or false"),
    "offline_answers": (_is_bool, "true or false"),
}
"""Settings of the whole guild (the scoped ones, and its moderation log)."""


def validate_guild_settings(data: Any) -> list[str]:
    """``{"guilds": {id: {"chat_channels": [int], "persona": str|None, "user_rate_per_minute": int|None,
    "tools": {name: bool}, "maintenance": {...}, "settings": {"server": {...}, "channels": {id: {...}}}}}}``.

    A guild entry may leave keys out (unset); present keys are typed precisely. ``maintenance``
    is the guild's own maintenance mode, shaped like the ``maintenance`` file; ``tools`` turns
    the tools of ``GUILD_TOOLS`` on or off (absent: off); ``settings`` holds what ``/settings`` set
    for the whole guild (``server``) and per category, channel, forum or thread (``channels``), each
    value shaped as ``SERVER_SETTING_CHECKS`` / ``SCOPED_SETTING_CHECKS`` say.
    """
    problems = _check_keys(data, "guild_settings", {"guilds"})
    if problems:
        return problems
    guilds = data["guilds"]
    if not isinstance(guilds, dict):
        return [f"guild_settings.guilds: expected an object, got {type(guilds).__name__}"]
    for gid, entry in guilds.items():
        where = f"guild_settings.guilds[{gid!r}]"
        if not (isinstance(gid, str) and gid.isdecimal() and gid.isascii()):
            problems.append(f"{where}: guild id must be a string of digits")
        shape = _check_keys(entry, where, set(), _GUILD_KEYS | {"maintenance"})
        problems += shape
        if not isinstance(entry, dict):
            continue
        if "maintenance" in entry:
            problems += [f"{where}.{problem}" for problem in validate_maintenance(entry["maintenance"])]
        channels = entry.get("chat_channels", [])
        if not isinstance(channels, list) or not all(_is_int(c) and c > 0 for c in channels):
            problems.append(f"{where}.chat_channels: expected a list of positive ints")
        problems += _check_optional(entry.get("persona"), f"{where}.persona", _is_str, "str")
        rate = entry.get("user_rate_per_minute")
        if rate is not None and not (_is_int(rate) and rate >= 0):
            problems.append(f"{where}.user_rate_per_minute: expected an int >= 0 or null")
        problems += _check_tools(entry.get("tools", {}), f"{where}.tools")
        if "settings" in entry:
            problems += _check_settings(entry["settings"], f"{where}.settings")
    return problems


def _check_settings(settings: Any, where: str) -> list[str]:
    """``{"server": {name: value}, "channels": {id: {name: value}}}`` (both optional)."""
    problems = _check_keys(settings, where, set(), frozenset({"server", "channels"}))
    if not isinstance(settings, dict):
        return problems
    problems += _check_values(settings.get("server", {}), f"{where}.server", SERVER_SETTING_CHECKS)
    channels = settings.get("channels", {})
    if not isinstance(channels, dict):
        return [*problems, f"{where}.channels: expected an object, got {type(channels).__name__}"]
    for cid, values in channels.items():
        if not (isinstance(cid, str) and cid.isdecimal() and cid.isascii()):
            problems.append(f"{where}.channels[{cid!r}]: channel id must be a string of digits")
        problems += _check_values(values, f"{where}.channels[{cid!r}]", SCOPED_SETTING_CHECKS)
    return problems


def _check_values(
    values: Any, where: str, checks: dict[str, tuple[Callable[[Any], bool], str]]
) -> list[str]:
    if not isinstance(values, dict):
        return [f"{where}: expected an object, got {type(values).__name__}"]
    problems = [f"{where}: unknown setting {name!r}" for name in sorted(set(values) - set(checks), key=str)]
    for name, value in values.items():
        check = checks.get(name)
        if check is not None and not check[0](value):
            problems.append(f"{where}.{name}: expected {check[1]}, got {value!r}"[:300])
    return problems


def _check_tools(tools: Any, where: str) -> list[str]:
    if not isinstance(tools, dict):
        return [f"{where}: expected an object, got {type(tools).__name__}"]
    problems = [f"{where}: unknown tool {name!r}" for name in sorted(set(tools) - GUILD_TOOLS, key=str)]
    problems += [f"{where}.{name}: expected bool" for name, on in tools.items() if not isinstance(on, bool)]
    return problems


def validate_admins(data: Any) -> list[str]:
    """``{"user_ids": [int]}``."""
    problems = _check_keys(data, "admins", {"user_ids"})
    if problems:
        return problems
    ids = data["user_ids"]
    if not isinstance(ids, list) or not all(_is_int(i) and i > 0 for i in ids):
        problems.append("admins.user_ids: expected a list of positive ints")
    return problems


def validate_breakers(data: Any) -> list[str]:
    """``{"overrides": {name: {"state": "open"|"closed", "until": float|None, "reason": str}}}``."""
    problems = _check_keys(data, "breakers", {"overrides"})
    if problems:
        return problems
    overrides = data["overrides"]
    if not isinstance(overrides, dict):
        return [f"breakers.overrides: expected an object, got {type(overrides).__name__}"]
    for name, entry in overrides.items():
        where = f"breakers.overrides[{name!r}]"
        if not name:
            problems.append(f"{where}: breaker name must not be empty")
        shape = _check_keys(entry, where, {"state", "until", "reason"})
        problems += shape
        if not isinstance(entry, dict):
            continue
        if "state" in entry and entry["state"] not in ("open", "closed"):
            problems.append(f"{where}.state: expected 'open' or 'closed', got {entry['state']!r}")
        if "until" in entry:
            problems += _check_optional(entry["until"], f"{where}.until", _is_number, "number")
        if "reason" in entry and not isinstance(entry["reason"], str):
            problems.append(f"{where}.reason: expected str, got {type(entry['reason']).__name__}")
    return problems


def default_specs() -> list[FileSpec]:
    """The bot's four files: maintenance, guild_settings, admins, breakers."""
    return [
        FileSpec(
            "maintenance",
            lambda: {"enabled": False, "message": None, "since": None, "by": None},
            validate_maintenance,
        ),
        FileSpec("guild_settings", lambda: {"guilds": {}}, validate_guild_settings),
        FileSpec("admins", lambda: {"user_ids": []}, validate_admins),
        FileSpec("breakers", lambda: {"overrides": {}}, validate_breakers),
    ]


DEFAULT_FILES: tuple[str, ...] = tuple(spec.name for spec in default_specs())


# --- reports --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The verdict on one file as it is on disk now; ``source`` is what served it, if loaded."""

    name: str
    path: Path
    ok: bool
    problems: list[str]
    source: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What ``recover``/``load`` did: the source that served, what was rejected and moved aside.

    ``alert`` is true when the defaults were used because nothing valid existed.
    """

    name: str
    source: str
    alert: bool
    problems: list[str] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)

    @property
    def from_defaults(self) -> bool:
        return self.source == SOURCE_DEFAULTS


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """One timestamped backup copy."""

    name: str
    path: Path
    created_at: float
    size: int
    valid: bool


@dataclass(slots=True)
class FileStatus:
    """The state of one file in this process: what served it, whether it raised an alert."""

    name: str
    path: str
    loaded: bool = False
    source: str | None = None
    alert: bool = False
    last_error: str | None = None
    loaded_at: float | None = None


class _Rejected(Exception):
    """A candidate source could not serve; ``exists`` says whether there was anything at all."""

    def __init__(self, problem: str, *, exists: bool) -> None:
        super().__init__(problem)
        self.problem = problem
        self.exists = exists


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# --- the sync core --------------------------------------------------------------------------


class DataStore:
    """Named JSON files with atomic writes, backups and recovery. Thread-safe per file.

    ``load(name)`` returns a copy of the current state (recovering it on first use);
    ``save(name, data)`` validates, then commits atomically. ``on_event(kind, payload)`` hears
    ``datastore.recovered`` and ``datastore.alert``; it is called from whichever thread runs the
    store (a worker thread under ``DataStoreService``), so a listener that touches asyncio must
    hop over with ``loop.call_soon_threadsafe``.

    One process owns a data directory (``DataStoreService`` and the offline CLI hold its
    ``DataDirLock``): the locks here serialise writers within this process only.
    """

    def __init__(
        self,
        data_dir: Path,
        specs: Iterable[FileSpec] | None = None,
        *,
        keep_backups: int = 10,
        keep_quarantined: int = KEEP_QUARANTINED,
        max_file_bytes: int = MAX_FILE_BYTES,
        clock: Clock | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        logger: Any = None,
    ) -> None:
        if keep_backups < 1 or keep_quarantined < 1 or max_file_bytes < 1:
            raise ValueError("keep_backups, keep_quarantined and max_file_bytes must be >= 1")
        self.data_dir = Path(data_dir)
        self.backup_dir = self.data_dir / "backups"
        self.quarantine_dir = self.data_dir / "quarantine"
        self.specs: dict[str, FileSpec] = {s.name: s for s in (default_specs() if specs is None else specs)}
        for name in self.specs:
            # Names become file names and part of the backup pattern: keep them plain.
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"file name {name!r} must be letters, digits and underscores")
        self.keep_backups = keep_backups
        self.keep_quarantined = keep_quarantined
        self.max_file_bytes = max_file_bytes
        self._clock: Clock = clock or SystemClock()
        self._on_event = on_event
        self._log = logger or structlog.get_logger("datastore")
        self._locks = {name: threading.Lock() for name in self.specs}
        # The cache is the committed bytes: parsing them hands every caller a private copy,
        # several times faster than deepcopy of the parsed state.
        self._good_bytes: dict[str, bytes] = {}
        self._status = {name: FileStatus(name, str(self.path(name))) for name in self.specs}
        self._source_counts: dict[tuple[str, str], int] = {}
        self._counts_lock = threading.Lock()  # loads of different files run in different threads
        self._last_stamp_us: dict[str, int] = {}

    # paths

    def names(self) -> list[str]:
        return list(self.specs)

    def path(self, name: str) -> Path:
        return self.data_dir / f"{name}.json"

    def bak_path(self, name: str) -> Path:
        return self.data_dir / f"{name}.json.bak"

    def _spec(self, name: str) -> FileSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownFileError(name, self.specs) from None

    # public API

    def check(self, name: str, data: Any) -> list[str]:
        """The problems with ``data`` as content of ``name`` (empty when valid); writes nothing."""
        spec = self._spec(name)
        try:
            problems = list(spec.validate(data))
        except Exception as exc:  # a validator must never take the store down with it
            problems = [f"validator failed: {exc!r}"]
        if not problems:
            try:
                size = len(self._encode(data))
            except (TypeError, ValueError) as exc:
                problems = [f"not JSON-serialisable: {exc}"]
            else:
                # What is written must be readable again: the read side refuses larger files.
                if size > self.max_file_bytes:
                    problems = [f"too large: {size} bytes as JSON, the limit is {self.max_file_bytes}"]
        return problems

    def load(self, name: str) -> dict[str, Any]:
        """The current state of ``name`` (a copy), loading and recovering it on first use."""
        self._spec(name)
        with self._locks[name]:
            if name not in self._good_bytes:
                self._load_locked(name)
            return json.loads(self._good_bytes[name])  # type: ignore[no-any-return]

    def cached(self, name: str) -> dict[str, Any] | None:
        """The last committed state (a copy) without I/O or waiting for a lock; None before the first load."""
        payload = self._good_bytes.get(self._spec(name).name)
        return None if payload is None else json.loads(payload)  # type: ignore[no-any-return]

    def save(self, name: str, data: dict[str, Any]) -> None:
        """Validate, then commit atomically; invalid data raises ``DataStoreValidationError`` unwritten."""
        problems = self.check(name, data)
        if problems:
            raise DataStoreValidationError(name, problems)
        payload = self._encode(data)
        with self._locks[name]:
            if name not in self._good_bytes:
                self._load_locked(name)
            self._commit(name, payload, previous=self._good_bytes[name])

    def recover(self, name: str) -> RecoveryReport:
        """Forget the cached state and reload ``name`` from the best valid source.

        When the file and its ``.bak`` are both bad, the state this process last committed
        (source ``memory``) comes before the timestamped backups: it is newer than any of them.
        """
        self._spec(name)
        with self._locks[name]:
            committed = self._good_bytes.pop(name, None)
            return self._load_locked(name, committed=committed)

    def validate(self, name: str | None = None) -> list[ValidationReport]:
        """Check the files on disk as they are now, without changing anything."""
        reports = []
        for n in [name] if name is not None else self.names():
            self._spec(n)
            with self._locks[n]:
                problems: list[str]
                try:
                    self._read_candidate(n, self.path(n))
                    problems = []
                except _Rejected as rej:
                    problems = [rej.problem]
                    # A missing file is fine on a fresh start; not when there is history to restore from.
                    if not rej.exists and not self.bak_path(n).exists() and not self._backup_paths(n):
                        problems = []
                source = self._status[n].source
            reports.append(ValidationReport(n, self.path(n), not problems, problems, source))
        return reports

    def list_backups(self, name: str | None = None) -> list[BackupInfo]:
        """Timestamped backups, newest first per file, each checked for validity."""
        infos = []
        for n in [name] if name is not None else self.names():
            self._spec(n)
            for path, stamp_us in self._backup_paths(n):
                try:
                    size = path.stat().st_size
                    self._read_candidate(n, path)
                    valid = True
                except _Rejected:
                    valid = False
                except OSError:
                    size, valid = 0, False
                infos.append(BackupInfo(n, path, stamp_us / 1e6, size, valid))
        return infos

    def status(self) -> dict[str, FileStatus]:
        """Per file: loaded or not, the source that served, the alert flag, the last error."""
        return {n: copy.copy(s) for n, s in self._status.items()}

    def alerts(self) -> list[str]:
        """Names of the files that fell back to defaults because nothing valid existed."""
        return [n for n, s in self._status.items() if s.alert]

    def source_counts(self) -> dict[tuple[str, str], int]:
        """How many loads each (file, source kind) served: kinds are file, bak, backup, defaults."""
        with self._counts_lock:
            return dict(self._source_counts)

    # loading and recovery

    def _load_locked(self, name: str, *, committed: bytes | None = None) -> RecoveryReport:
        """Find the best valid source, quarantine bad primaries, write recovered state back.

        ``committed`` is the state this process last committed; it serves after the file and
        the ``.bak`` and before the backups (which hold only superseded versions).
        """
        spec = self._spec(name)
        self._remove_stale_temps(name)
        problems: list[str] = []
        quarantined: list[Path] = []
        anything_existed = False
        data: dict[str, Any] | None = None
        source = SOURCE_DEFAULTS

        for label, path in [(SOURCE_FILE, self.path(name)), (SOURCE_BAK, self.bak_path(name))]:
            try:
                data = self._read_candidate(name, path)
                source = label
                break
            except _Rejected as rej:
                anything_existed |= rej.exists
                if rej.exists:
                    problems.append(f"{label}: {rej.problem}")
                    moved = self._quarantine(name, path, label)
                    if moved is not None:
                        quarantined.append(moved)
        if data is None and committed is not None:
            data, source = json.loads(committed), SOURCE_MEMORY
        if data is None:
            for path, _ in self._backup_paths(name):
                anything_existed = True
                try:
                    data = self._read_candidate(name, path)
                    source = f"{SOURCE_BACKUP}:{path.name}"
                    break
                except _Rejected as rej:
                    problems.append(f"backup {path.name}: {rej.problem}")
        alert = data is None and anything_existed
        if data is None:
            data = spec.default()

        status = self._status[name]
        status.loaded, status.source, status.alert = True, source, alert
        status.loaded_at = self._clock.time()
        status.last_error = "; ".join(problems) or None
        kind = source.split(":", 1)[0]
        with self._counts_lock:
            self._source_counts[(name, kind)] = self._source_counts.get((name, kind), 0) + 1

        payload = self._encode(data)
        self._good_bytes[name] = payload
        if source != SOURCE_FILE:
            try:
                self._commit(name, payload, previous=payload)
            except OSError as exc:
                # Serve the recovered state from memory; the next save tries the disk again.
                status.last_error = f"{status.last_error or ''}; write-back failed: {exc!r}".lstrip("; ")
                self._log.error("datastore.writeback_failed", file=name, error=repr(exc))

        report = RecoveryReport(name, source, alert, problems, quarantined)
        event = {
            "name": name,
            "source": source,
            "alert": alert,
            "problems": problems,
            "quarantined": [str(p) for p in quarantined],
        }
        if alert:
            self._log.error("datastore.alert", **event)
            self._emit("datastore.alert", event)
        elif problems or source not in (SOURCE_FILE, SOURCE_DEFAULTS):
            self._log.warning("datastore.recovered", **event)
            self._emit("datastore.recovered", event)
        else:
            self._log.info("datastore.loaded", file=name, source=source)
        return report

    def _read_candidate(self, name: str, path: Path) -> dict[str, Any]:
        """Read, parse and validate one candidate file, or raise ``_Rejected`` saying why."""
        try:
            raw = self._read_capped(path)
        except FileNotFoundError:
            raise _Rejected("missing", exists=False) from None
        except OSError as exc:
            raise _Rejected(f"unreadable: {exc.strerror or exc!r}", exists=True) from None
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            reason = "empty" if not raw.strip() else f"not JSON: {str(exc)[:200]}"
            raise _Rejected(reason, exists=True) from None
        problems = self.check(name, data)
        if problems:
            raise _Rejected("invalid: " + "; ".join(problems[:10]), exists=True)
        return data  # type: ignore[no-any-return]

    def _read_capped(self, path: Path) -> bytes:
        """The bytes of ``path``; ``_Rejected`` when it holds more than ``max_file_bytes``.

        The size is checked before reading, and the read stops one byte past the limit, so a
        huge file (or one still growing) is never loaded whole.
        """
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            too_large = _Rejected(f"too large: {size} bytes, the limit is {self.max_file_bytes}", exists=True)
            if size > self.max_file_bytes:
                raise too_large
            raw = f.read(self.max_file_bytes + 1)
        if len(raw) > self.max_file_bytes:
            raise too_large
        return raw

    def _quarantine(self, name: str, path: Path, label: str) -> Path | None:
        """Move a bad file aside so it is kept for inspection but never read again; keep the newest few."""
        prefix = name if label == SOURCE_FILE else f"{name}.{label}"
        target = self.quarantine_dir / f"{prefix}-{self._stamp(name)}.json"
        try:
            make_private_dir(self.quarantine_dir)
            os.replace(path, target)
            _fsync_dir(self.data_dir)
        except OSError as exc:
            self._log.error("datastore.quarantine_failed", file=name, path=str(path), error=repr(exc))
            return None
        for old in self._quarantined_paths(name)[self.keep_quarantined :]:
            with suppress(OSError):  # pruning is housekeeping: it must never fail a load
                old.unlink()
        return target

    def _quarantined_paths(self, name: str) -> list[Path]:
        """Quarantined copies of ``name`` and of its ``.bak``, newest first."""
        pattern = re.compile(rf"^{re.escape(name)}(?:\.{SOURCE_BAK})?-{_STAMP_RE}\.json$")
        try:
            entries = list(os.scandir(self.quarantine_dir))
        except OSError:
            return []
        found = [
            (_parse_stamp_us(m.group(1)), entry.name, Path(entry.path))
            for entry in entries
            if (m := pattern.match(entry.name))
        ]
        found.sort(reverse=True)
        return [path for _, _, path in found]

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, payload)
        except Exception as exc:  # a listener's bug must not break loading
            self._log.error("datastore.listener_failed", kind=kind, error=repr(exc))

    # writing

    @staticmethod
    def _encode(data: Any) -> bytes:
        """Canonical bytes of already-checked data."""
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"

    def _commit(self, name: str, payload: bytes, *, previous: bytes) -> None:
        """Keep ``previous`` as the .bak and as a timestamped backup, replace the file, rotate."""
        make_private_dir(self.data_dir)
        # One directory fsync after both renames makes both durable; should power fail between
        # them, the old .bak is still a complete, valid file.
        _atomic_write(self.bak_path(name), previous, sync_dir=False)
        _atomic_write(self.path(name), payload)  # the commit point
        self._good_bytes[name] = payload
        if previous == payload:
            return  # a write-back of recovered state: nothing new for the history
        try:
            make_private_dir(self.backup_dir)
            # The history holds superseded versions, so the newest backup is never newer than the
            # .bak and "file, .bak, newest backup" is the newest-first order of recovery.
            # History only: after a power cut the newest copy may be missing, never half-written.
            # Make room first: a kill between the copy and a later prune would leave keep + 1.
            self._rotate(name, keep=max(self.keep_backups - 1, 0))
            _atomic_write(self.backup_dir / f"{name}-{self._stamp(name)}.json", previous, sync_dir=False)
            self._rotate(name)
        except OSError as exc:
            # The save itself is committed; a missing history copy is worth a log line, not a failure.
            self._status[name].last_error = f"backup failed: {exc!r}"
            self._log.error("datastore.backup_failed", file=name, error=repr(exc))

    def _rotate(self, name: str, keep: int | None = None) -> None:
        for path, _ in self._backup_paths(name)[self.keep_backups if keep is None else keep :]:
            with suppress(FileNotFoundError):
                path.unlink()

    def _backup_paths(self, name: str) -> list[tuple[Path, int]]:
        """Backups of ``name`` with their timestamps in microseconds, newest first."""
        pattern = re.compile(rf"^{re.escape(name)}-{_STAMP_RE}\.json$")
        found = []
        try:
            entries = list(os.scandir(self.backup_dir))
        except OSError:
            return []
        for entry in entries:
            m = pattern.match(entry.name)
            if m:
                found.append((Path(entry.path), _parse_stamp_us(m.group(1))))
        found.sort(key=lambda item: (item[1], item[0].name), reverse=True)
        return found

    def _stamp(self, name: str) -> str:
        """A UTC timestamp for file names, strictly increasing per file even on a frozen clock."""
        now_us = int(self._clock.time() * 1_000_000)
        last = self._last_stamp_us.get(name)
        if last is None:
            newest = self._backup_paths(name)
            last = newest[0][1] if newest else 0
        stamp_us = max(now_us, last + 1)
        self._last_stamp_us[name] = stamp_us
        return datetime.fromtimestamp(stamp_us // 1_000_000, UTC).strftime("%Y%m%dT%H%M%S") + (
            f".{stamp_us % 1_000_000:06d}"
        )

    def _remove_stale_temps(self, name: str) -> None:
        """Delete temp files of ``name`` left by writers that died (their pid no longer exists)."""
        for directory, target_prefix in [(self.data_dir, f"{name}.json"), (self.backup_dir, f"{name}-")]:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                m = _TEMP_RE.match(entry.name)
                if m is None or not m.group("target").startswith(target_prefix):
                    continue
                if not _pid_alive(int(m.group("pid"))):
                    with suppress(OSError):
                        os.unlink(entry.path)


# Temp files are ".<target>.<pid>.<random>.tmp" (see _atomic_write); mkstemp's random part has no dots.
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _parse_stamp_us(stamp: str) -> int:
    whole, frac = stamp.split(".")
    seconds = datetime.strptime(whole, "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()
    return int(seconds) * 1_000_000 + int(frac)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, payload: bytes, *, sync_dir: bool = True) -> None:
    """Write ``payload`` to ``path`` so a reader sees the old content or the new, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


# --- the async service ----------------------------------------------------------------------


class BreakerLike(Protocol):
    """What the service needs from a circuit breaker (resilience/breakers.py provides one)."""

    async def call(
        self, fn: Callable[..., Awaitable[T]], /, *args: Any, timeout: float | None = None  # noqa: ASYNC109
    ) -> T: ...


class DataStoreService:
    """The DataStore as a registry service: loads every file at start, runs the sync core in threads.

    While it runs it holds the data directory's lock (``DataDirLock``), so a second bot on
    the same directory, or the offline datastore tool, is refused instead of racing this one.
    Caller mistakes (unknown name, invalid data) are raised before the breaker so they never
    count as failures of the disk.
    """

    name = "datastore"
    depends_on: tuple[str, ...] = ()

    def __init__(self, store: DataStore, *, breaker: BreakerLike | None = None) -> None:
        self.store = store
        self._breaker = breaker
        self._locks = {name: asyncio.Lock() for name in store.names()}
        self._dir_lock = DataDirLock(store.data_dir)
        self._started = False

    async def start(self) -> None:
        """Take the data directory's lock (creating the directory, mode 0700), then load every file.

        Raises ``DataDirLockedError`` (naming the directory and the holder's pid) when another
        process holds the directory.
        """
        # Synchronous on purpose (a mkdir and a non-blocking flock): in a thread, a cancelled
        # start() could leave the lock taken by nobody who will release it.
        self._dir_lock.acquire()
        try:
            for name in self.store.names():
                await self.get(name)
        except BaseException:
            self._dir_lock.release()
            raise
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._dir_lock.release()

    def health(self) -> dict[str, Any]:
        """``{"ok": ..., "files": {name: status}, "alerts": [names]}``; not ok while an alert stands."""
        alerts = self.store.alerts()
        return {
            "ok": self._started and not alerts,
            "files": {n: asdict(s) for n, s in self.store.status().items()},
            "alerts": alerts,
        }

    async def get(self, name: str) -> dict[str, Any]:
        async with self._lock(name):
            return await self._run(self.store.load, name)

    def peek(self, name: str) -> dict[str, Any] | None:
        """The last committed state, synchronously and without blocking (for per-message checks)."""
        return self.store.cached(name)

    async def save(self, name: str, data: dict[str, Any]) -> None:
        self._raise_if_invalid(name, data)
        async with self._lock(name):
            await self._run(self.store.save, name, data)

    async def update(
        self, name: str, fn: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Read-modify-write under the file's lock; ``fn`` returns the new state or mutates in place."""
        async with self._lock(name):
            current = await self._run(self.store.load, name)
            result = fn(current)
            new = current if result is None else result
            self._raise_if_invalid(name, new)
            await self._run(self.store.save, name, new)
            return copy.deepcopy(new)

    async def validate(self, name: str | None = None) -> list[ValidationReport]:
        return await self._run(self.store.validate, name)

    async def recover(self, name: str) -> RecoveryReport:
        async with self._lock(name):
            return await self._run(self.store.recover, name)

    async def list_backups(self, name: str | None = None) -> list[BackupInfo]:
        return await self._run(self.store.list_backups, name)

    def add_listener(self, listener: Callable[[str], Awaitable[None]]) -> None:
        """Nothing to listen to: nobody else changes these files (one process owns the directory)."""

    def _lock(self, name: str) -> asyncio.Lock:
        try:
            return self._locks[name]
        except KeyError:
            raise UnknownFileError(name, self._locks) from None

    def _raise_if_invalid(self, name: str, data: Any) -> None:
        problems = self.store.check(name, data)
        if problems:
            raise DataStoreValidationError(name, problems)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._breaker is None:
            return await asyncio.to_thread(fn, *args)
        return await self._breaker.call(asyncio.to_thread, fn, *args)


# --- what the bot uses, whichever backend keeps the state -------------------------------------

ChangeListener = Callable[[str], Awaitable[None]]
"""Called with a document's name after another process changed it (and this one reloaded it)."""


class SharedState(Protocol):
    """The committed state, read without I/O (per-message checks, status views)."""

    def names(self) -> list[str]: ...
    def cached(self, name: str) -> dict[str, Any] | None: ...
    def check(self, name: str, data: Any) -> list[str]: ...
    def alerts(self) -> list[str]: ...
    def status(self) -> dict[str, FileStatus]: ...


class SharedStateService(Protocol):
    """The registry service that reads and writes the state (``DataStoreService``, ``PgDataStore``)."""

    name: str
    depends_on: tuple[str, ...]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def health(self) -> dict[str, Any]: ...
    async def get(self, name: str) -> dict[str, Any]: ...
    def peek(self, name: str) -> dict[str, Any] | None: ...
    async def save(self, name: str, data: dict[str, Any]) -> None: ...
    async def update(
        self, name: str, fn: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]: ...
    async def validate(self, name: str | None = None) -> list[ValidationReport]: ...
    async def recover(self, name: str) -> RecoveryReport: ...
    async def list_backups(self, name: str | None = None) -> list[BackupInfo]: ...
    def add_listener(self, listener: ChangeListener) -> None: ...


# --- the state in PostgreSQL, shared by every process on the database ---------------------------

SOURCE_ROW = "row"          # the document's row as it is
SOURCE_HISTORY = "history"  # a version it replaced ("history:<version>")
STATE_CHANGED = "state"     # the notification kind: {"name", "version"}


class _Refused(Exception):
    """Internal: an update's function refused (or its result was invalid); nothing was written."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class PgDataStore:
    """The DataStore's documents as JSONB rows with a version, in the ``PostgresStore``'s database.

    One object plays both parts the JSON store splits in two: the cached view (``SharedState``:
    ``cached``, ``names``, ``check``, ``alerts``, ``status``) and the service (``SharedStateService``).
    Every write is one transaction under the row's lock (``SELECT ... FOR UPDATE``): the version goes
    up by one, the replaced version is kept in ``shared_state_history`` (the newest ``keep_history``),
    and a ``state`` notification (name, version) goes to the other processes with the commit. They
    reload that row and call their listeners (``add_listener``); after their notification session was
    lost they reload every document. Validation uses the same ``FileSpec`` validators as the files.

    A row that fails validation (edited by hand) is recovered like a damaged file: the newest valid
    version of its history, else the defaults (an alert), written back as a new version. Backups of
    the whole database: ``pg_dump`` (README, "Scaling out"). It holds the data directory's lock
    like ``DataStoreService`` (the directory keeps the attachment spool): one process per DATA_DIR.
    """

    name = "datastore"
    depends_on: tuple[str, ...] = ("storage",)

    def __init__(
        self,
        store: PostgresStore,
        data_dir: Path,
        specs: Iterable[FileSpec] | None = None,
        *,
        keep_history: int = 10,
        clock: Clock | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        logger: Any = None,
    ) -> None:
        if keep_history < 1:
            raise ValueError("keep_history must be at least 1")
        self._store = store
        self.data_dir = Path(data_dir)
        self.specs: dict[str, FileSpec] = {s.name: s for s in (default_specs() if specs is None else specs)}
        self.keep_history = keep_history
        self._clock: Clock = clock or SystemClock()
        self._log = logger or structlog.get_logger("datastore")
        self._on_event = on_event
        self._checker = DataStore(self.data_dir, self.specs.values())  # validation only: no file I/O
        self._cache: dict[str, bytes] = {}
        self._versions: dict[str, int] = {}
        self._status = {n: FileStatus(n, self._where(n)) for n in self.specs}
        self._listeners: list[ChangeListener] = []
        self._dir_lock = DataDirLock(self.data_dir)
        self._subscribed = False
        self._started = False

    @staticmethod
    def _where(name: str) -> str:
        return f"postgresql:shared_state/{name}"

    # -- SharedState: the cached view ------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.specs)

    def check(self, name: str, data: Any) -> list[str]:
        """The problems with ``data`` as document ``name`` (the file validators'), writing nothing."""
        return self._checker.check(name, data)

    def cached(self, name: str) -> dict[str, Any] | None:
        """The last committed state (a copy) without I/O; None before it was loaded."""
        self._spec(name)
        payload = self._cache.get(name)
        return None if payload is None else json.loads(payload)  # type: ignore[no-any-return]

    peek = cached

    def alerts(self) -> list[str]:
        return [n for n, s in self._status.items() if s.alert]

    def status(self) -> dict[str, FileStatus]:
        return {n: copy.copy(s) for n, s in self._status.items()}

    def versions(self) -> dict[str, int]:
        """Each document's version as this process last read or wrote it."""
        return dict(self._versions)

    def _spec(self, name: str) -> FileSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownFileError(name, self.specs) from None

    # -- the service ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the data directory, create missing documents (their defaults, version 1), load all."""
        self._dir_lock.acquire()
        try:
            now = self._clock.time()

            async def create(conn: asyncpg.Connection) -> None:
                for name, spec in self.specs.items():
                    await conn.execute(
                        "INSERT INTO shared_state (name, data, version, updated_at) "
                        "VALUES ($1, $2::jsonb, 1, $3) ON CONFLICT (name) DO NOTHING",
                        name, json.dumps(spec.default()), now,
                    )

            await self._store.transaction("shared_state.create", create)
            for name in self.specs:
                await self._load(name)
            if not self._subscribed:
                self._store.subscribe(STATE_CHANGED, self._on_changed)
                self._store.subscribe("resync", self._on_resync)
                self._subscribed = True
        except BaseException:
            self._dir_lock.release()
            raise
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._dir_lock.release()

    def health(self) -> dict[str, Any]:
        """``{"ok", "backend", "files": {name: status}, "versions", "alerts"}``."""
        alerts = self.alerts()
        return {
            "ok": self._started and not alerts,
            "backend": "postgresql",
            "files": {n: asdict(s) for n, s in self._status.items()},
            "versions": self.versions(),
            "alerts": alerts,
        }

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(name)`` after another process changed document ``name`` (reloaded here)."""
        self._listeners.append(listener)

    async def get(self, name: str) -> dict[str, Any]:
        """The current state of ``name`` (a copy), as last loaded or written here."""
        self._spec(name)
        if name not in self._cache:
            await self._load(name)
        return self.cached(name) or {}

    async def save(self, name: str, data: dict[str, Any]) -> None:
        """Validate, then write ``data`` as the next version (one transaction), and tell the others."""
        self._raise_if_invalid(name, data)
        await self._write(name, lambda _current: data)

    async def update(
        self, name: str, fn: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Read-modify-write under the row's lock: no other process writes ``name`` in between.

        ``fn`` gets the committed state and returns the new one or mutates it in place; if it
        raises, or its result is invalid, nothing is written and the error is raised (outside the
        storage breaker: a refused change is no failure of the database).
        """
        self._spec(name)
        return await self._write(name, fn)

    async def _write(
        self, name: str, fn: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]:
        now = self._clock.time()
        origin = self._store.process_name

        async def body(conn: asyncpg.Connection) -> tuple[dict[str, Any], int] | _Refused:
            row = await conn.fetchrow(
                "SELECT data::text, version, updated_at FROM shared_state WHERE name = $1 FOR UPDATE", name
            )
            current = json.loads(row[0]) if row is not None else self.specs[name].default()
            version = int(row[1]) if row is not None else 0
            try:
                working = copy.deepcopy(current)
                result = fn(working)
                new = working if result is None else result
                self._raise_if_invalid(name, new)
            except Exception as exc:
                return _Refused(exc)
            if row is not None:
                await conn.execute(
                    "INSERT INTO shared_state_history (name, version, data, updated_at) "
                    "VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT DO NOTHING",
                    name, version, row[0], row[2],
                )
                await conn.execute(
                    "DELETE FROM shared_state_history WHERE name = $1 AND version <= $2", name,
                    version - self.keep_history,
                )
            await conn.execute(
                "INSERT INTO shared_state (name, data, version, updated_at, updated_by) "
                "VALUES ($1, $2::jsonb, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET "
                "data = EXCLUDED.data, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, "
                "updated_by = EXCLUDED.updated_by",
                name, json.dumps(new), version + 1, now, origin,
            )
            await self._store.notify_in(conn, STATE_CHANGED, {"name": name, "version": version + 1})
            return new, version + 1

        outcome = await self._store.transaction(f"shared_state.{name}", body)
        if isinstance(outcome, _Refused):
            raise outcome.error
        new, version = outcome
        self._remember(name, new, version, SOURCE_ROW)
        return copy.deepcopy(new)

    async def validate(self, name: str | None = None) -> list[ValidationReport]:
        """Check the rows as they are in the database now, changing nothing."""
        names = [name] if name is not None else self.names()
        for n in names:
            self._spec(n)

        async def body(conn: asyncpg.Connection) -> list[tuple[str, str | None]]:
            rows = await conn.fetch(
                "SELECT name, data::text FROM shared_state WHERE name = ANY($1::text[])", names
            )
            found = {r[0]: r[1] for r in rows}
            return [(n, found.get(n)) for n in names]

        reports = []
        for n, text in await self._store.transaction("shared_state.validate", body):
            problems = ["missing"] if text is None else self.check(n, json.loads(text))
            reports.append(
                ValidationReport(n, Path(self._where(n)), not problems, problems, self._status[n].source)
            )
        return reports

    async def recover(self, name: str) -> RecoveryReport:
        """Reload ``name`` from its row, or its newest valid earlier version, or the defaults."""
        self._spec(name)
        return await self._load(name)

    async def list_backups(self, name: str | None = None) -> list[BackupInfo]:
        """The versions each document replaced, newest first, each checked for validity."""
        names = [name] if name is not None else self.names()
        for n in names:
            self._spec(n)

        async def body(conn: asyncpg.Connection) -> list[Any]:
            return list(
                await conn.fetch(
                    "SELECT name, version, data::text, updated_at FROM shared_state_history "
                    "WHERE name = ANY($1::text[]) ORDER BY name, version DESC",
                    names,
                )
            )

        infos = []
        for n, version, text, at in await self._store.transaction("shared_state.history", body):
            valid = not self.check(n, json.loads(text))
            infos.append(BackupInfo(n, Path(f"{self._where(n)}@{version}"), at, len(text), valid))
        return infos

    # -- loading, and other processes' changes ----------------------------------------------------

    async def _load(self, name: str) -> RecoveryReport:
        """Read ``name``'s row; an invalid one is recovered from its history or the defaults."""

        async def body(conn: asyncpg.Connection) -> tuple[Any, list[Any]]:
            row = await conn.fetchrow("SELECT data::text, version FROM shared_state WHERE name = $1", name)
            history = await conn.fetch(
                "SELECT version, data::text FROM shared_state_history WHERE name = $1 ORDER BY version DESC",
                name,
            )
            return row, list(history)

        row, history = await self._store.transaction(f"shared_state.load.{name}", body)
        problems: list[str] = []
        if row is not None:
            data = json.loads(row[0])
            problems = [f"row: {p}" for p in self.check(name, data)]
            if not problems:
                self._remember(name, data, int(row[1]), SOURCE_ROW)
                return RecoveryReport(name, SOURCE_ROW, False)
        chosen: tuple[dict[str, Any], str] | None = None
        for version, text in history:
            candidate = json.loads(text)
            if not self.check(name, candidate):
                chosen = (candidate, f"{SOURCE_HISTORY}:{version}")
                break
            problems.append(f"history {version}: invalid")
        alert = chosen is None
        data, source = chosen if chosen is not None else (self.specs[name].default(), SOURCE_DEFAULTS)
        await self._write(name, lambda _current: data)
        status = self._status[name]
        status.source, status.alert, status.last_error = source, alert, "; ".join(problems) or None
        event = {"name": name, "source": source, "alert": alert, "problems": problems, "quarantined": []}
        kind = "datastore.alert" if alert else "datastore.recovered"
        if alert:
            self._log.error(kind, **event)
        else:
            self._log.warning(kind, **event)
        if self._on_event is not None:
            try:
                self._on_event(kind, event)
            except Exception as exc:  # a listener's bug must not break loading
                self._log.error("datastore.listener_failed", kind=kind, error=repr(exc))
        return RecoveryReport(name, source, alert, problems)

    def _remember(self, name: str, data: dict[str, Any], version: int, source: str) -> None:
        self._cache[name] = json.dumps(data).encode()
        self._versions[name] = version
        status = self._status[name]
        status.loaded, status.loaded_at = True, self._clock.time()
        if source == SOURCE_ROW and not status.alert:
            status.source, status.last_error = SOURCE_ROW, None

    async def _on_changed(self, message: dict[str, Any]) -> None:
        name, version = message.get("name"), message.get("version")
        if name not in self.specs or not isinstance(version, int):
            return
        if version <= self._versions.get(name, 0):
            return  # this process wrote it, or already read it
        await self._load(name)
        await self._tell(name)

    async def _on_resync(self, message: dict[str, Any]) -> None:
        before = dict(self._versions)
        for name in self.specs:
            await self._load(name)
        for name in self.specs:
            if self._versions.get(name) != before.get(name):
                await self._tell(name)

    async def _tell(self, name: str) -> None:
        for listener in list(self._listeners):
            try:
                await listener(name)
            except Exception as exc:  # one listener's bug must not stop the others
                self._log.error("datastore.listener_failed", file=name, error=repr(exc), exc_info=exc)

    def _raise_if_invalid(self, name: str, data: Any) -> None:
        problems = self.check(name, data)
        if problems:
            raise DataStoreValidationError(name, problems)
