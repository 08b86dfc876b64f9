"""The JSON DataStore: corruption recovery, validation, backups, serialised writes, service, CLI."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.cli import main as cli_main
from resilience.breakers import Breaker
from resilience.clock import FakeClock
from resilience.errors import CircuitOpenError
from resilience.registry import ServiceRegistry
from services.datastore import (
    DEFAULT_FILES,
    KEEP_QUARANTINED,
    MAX_FILE_BYTES,
    DataStore,
    DataStoreService,
    DataStoreValidationError,
    UnknownFileError,
    default_specs,
)

REPO = Path(__file__).resolve().parents[2]

# Three saves on top of the defaults: v3 is the file, v2 the .bak, backups hold v0 (defaults), v1, v2.
V0: dict[str, Any] = {"user_ids": []}
V1 = {"user_ids": [1]}
V2 = {"user_ids": [1, 2]}
V3 = {"user_ids": [1, 2, 3]}

Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory for one test."""
    return tmp_path / "data"


@pytest.fixture
def events() -> Events:
    """Every ``on_event`` call the stores of this test make, in order."""
    return []


@pytest.fixture
def make_store(data_dir: Path, events: Events, fake_clock: FakeClock) -> Callable[..., DataStore]:
    """Build a fresh DataStore on ``data_dir`` (a new one is a process restart)."""

    def make(**kwargs: Any) -> DataStore:
        kwargs.setdefault("clock", fake_clock)
        return DataStore(data_dir, on_event=lambda kind, payload: events.append((kind, payload)), **kwargs)

    return make


def seed_history(store: DataStore) -> None:
    """Commit V1, V2, V3 to ``admins`` (after its defaults, V0)."""
    for version in (V1, V2, V3):
        store.save("admins", version)


def quarantined(data_dir: Path) -> list[str]:
    qdir = data_dir / "quarantine"
    return sorted(p.name for p in qdir.iterdir()) if qdir.exists() else []


# --- the corruption matrix ------------------------------------------------------------------


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff\xfe\x89PNG garbage \xc3\x28")


def _invalid_json_schema(path: Path) -> None:
    path.write_text(json.dumps({"user_ids": ["not-an-int", True]}))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _missing(path: Path) -> None:
    path.unlink()


def _directory_in_place(path: Path) -> None:
    # Honest "unreadable": tests run as root, where chmod 000 does not stop reads, but reading a
    # directory fails with an OSError (EISDIR) through the very same read path.
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


def _chmod_000(path: Path) -> None:
    path.chmod(0)


CASES = [
    pytest.param(_truncate, "bak", V2, True, id="truncated"),
    pytest.param(_garbage, "bak", V2, True, id="garbage-bytes"),
    pytest.param(_invalid_json_schema, "bak", V2, True, id="valid-json-invalid-schema"),
    pytest.param(_empty, "bak", V2, True, id="empty"),
    pytest.param(_missing, "bak", V2, False, id="missing"),
    pytest.param(_directory_in_place, "bak", V2, True, id="unreadable-directory-in-place"),
    pytest.param(
        _chmod_000,
        "bak",
        V2,
        True,
        id="unreadable-chmod-000",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads through chmod 000"),
    ),
]


@pytest.mark.parametrize(("corrupt", "source", "expected", "quarantines"), CASES)
def test_corrupt_file_recovers_newest_valid_state_from_bak_and_is_quarantined(
    make_store: Callable[..., DataStore],
    data_dir: Path,
    events: Events,
    corrupt: Callable[[Path], None],
    source: str,
    expected: dict[str, Any],
    quarantines: bool,
) -> None:
    """A bad primary file is moved aside, the .bak serves, is reported, counted and written back."""
    seed_history(make_store())
    corrupt(data_dir / "admins.json")

    store = make_store()
    assert store.load("admins") == expected
    status = store.status()["admins"]
    assert (status.source, status.alert) == (source, False)
    assert store.source_counts()[("admins", source)] == 1
    assert ("datastore.recovered", source) in [(k, p["source"]) for k, p in events]
    # The recovered state is the new good file: the next start serves it from the file.
    assert json.loads((data_dir / "admins.json").read_text()) == expected
    assert make_store().status()["admins"].source is None
    assert quarantined(data_dir) == (["admins-" + q.split("-", 1)[1] for q in quarantined(data_dir)])
    assert len(quarantined(data_dir)) == (1 if quarantines else 0)


def test_corrupt_file_and_corrupt_bak_recover_from_newest_valid_timestamped_backup(
    make_store: Callable[..., DataStore], data_dir: Path, events: Events
) -> None:
    """With file and .bak both bad, the newest valid backup serves and both bad files are quarantined."""
    seed_history(make_store())
    _garbage(data_dir / "admins.json")
    _truncate(data_dir / "admins.json.bak")
    newest = max((data_dir / "backups").glob("admins-*.json"))

    store = make_store()
    assert store.load("admins") == V2
    assert store.status()["admins"].source == f"backup:{newest.name}"
    assert store.source_counts()[("admins", "backup")] == 1
    assert [k for k, _ in events] == ["datastore.recovered"]
    names = quarantined(data_dir)
    assert len(names) == 2 and sum(n.startswith("admins.bak-") for n in names) == 1
    assert make_store().load("admins") == V2


def test_invalid_newest_backup_is_skipped_for_the_next_valid_one(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """Backups are tried newest first and an invalid one is passed over."""
    seed_history(make_store())
    _garbage(data_dir / "admins.json")
    _garbage(data_dir / "admins.json.bak")
    backups = sorted((data_dir / "backups").glob("admins-*.json"))
    _empty(backups[-1])  # V2's copy

    store = make_store()
    assert store.load("admins") == V1
    assert store.status()["admins"].source == f"backup:{backups[-2].name}"
    assert [b.valid for b in store.list_backups("admins")][:2] == [False, True]


def test_everything_corrupt_falls_back_to_defaults_with_an_alert(
    make_store: Callable[..., DataStore], data_dir: Path, events: Events
) -> None:
    """Defaults because nothing valid existed is an alert: event, status flag, unhealthy service."""
    seed_history(make_store())
    _garbage(data_dir / "admins.json")
    _garbage(data_dir / "admins.json.bak")
    for backup in (data_dir / "backups").glob("admins-*.json"):
        _empty(backup)

    store = make_store()
    assert store.load("admins") == V0
    status = store.status()["admins"]
    assert (status.source, status.alert) == ("defaults", True)
    assert status.last_error and "file: not JSON" in status.last_error
    assert store.alerts() == ["admins"]
    assert [k for k, _ in events] == ["datastore.alert"]
    assert events[0][1]["name"] == "admins"


def test_a_huge_file_is_quarantined_without_being_read_whole_and_the_bak_serves(
    make_store: Callable[..., DataStore], data_dir: Path, events: Events
) -> None:
    """A 64 MiB admins.json (the bug: a 200 MB file was loaded whole) is over the 1 MiB cap:
    it is rejected from its size, moved aside intact, and the .bak serves. Python never holds
    more than a few MiB while that happens."""
    seed_history(make_store())
    huge = data_dir / "admins.json"
    with huge.open("r+b") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: costs no disk, but reading it would cost 64 MiB
    assert MAX_FILE_BYTES == 1024 * 1024
    store = make_store()
    tracemalloc.start()
    try:
        assert store.load("admins") == V2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak
    status = store.status()["admins"]
    assert status.source == "bak" and status.last_error is not None
    assert f"file: too large: {64 * 1024 * 1024} bytes, the limit is {MAX_FILE_BYTES}" in status.last_error
    assert ("datastore.recovered", "bak") in [(k, p["source"]) for k, p in events]
    (moved,) = (data_dir / "quarantine").iterdir()
    assert moved.stat().st_size == 64 * 1024 * 1024


def test_a_file_one_byte_over_the_cap_is_corrupt_like_any_other_and_one_at_the_cap_is_read(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """The cap is exact: valid JSON padded to cap + 1 bytes is rejected, to the cap it serves."""
    seed_history(make_store())
    body = json.dumps(V3).encode()
    path = data_dir / "admins.json"
    path.write_bytes(body + b" " * (1000 - len(body)))
    assert make_store(max_file_bytes=1000).load("admins") == V3
    path.write_bytes(body + b" " * (1001 - len(body)))
    store = make_store(max_file_bytes=1000)
    assert store.load("admins") == V2  # the .bak serves
    assert store.status()["admins"].source == "bak"
    assert len(quarantined(data_dir)) == 1
    assert [r.problems for r in make_store(max_file_bytes=1000).validate("admins")] == [[]]


def test_save_refuses_what_the_size_cap_would_refuse_to_read_back(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """Writing a file the next start would quarantine loses data: save refuses it instead."""
    store = make_store(max_file_bytes=200)
    store.save("admins", V1)
    big = {"user_ids": list(range(1, 100))}
    with pytest.raises(DataStoreValidationError, match=r"too large: .* the limit is 200"):
        store.save("admins", big)
    assert make_store(max_file_bytes=200).load("admins") == V1


def test_quarantine_keeps_the_newest_copies_per_file_over_many_corruption_cycles(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """50 corruption cycles (the bug: 100 files piled up) leave the newest KEEP_QUARANTINED
    copies of the file and its .bak together, and another file's copies are untouched."""
    store = make_store()
    store.save("maintenance", {"enabled": True, "message": None, "since": None, "by": None})
    _garbage(data_dir / "maintenance.json")
    store.recover("maintenance")
    seed_history(store)
    for cycle in range(50):
        _garbage(data_dir / "admins.json")
        if cycle % 2:
            _garbage(data_dir / "admins.json.bak")
        report = store.recover("admins")
        assert len(report.quarantined) == 1 + cycle % 2
    names = quarantined(data_dir)
    admins = [n for n in names if n.startswith("admins")]
    assert KEEP_QUARANTINED == 10
    assert len(admins) == KEEP_QUARANTINED and any(n.startswith("admins.bak-") for n in admins)
    assert len([n for n in names if n.startswith("maintenance")]) == 1
    # The newest were kept: the last cycle's two copies are among them.
    assert {p.name for p in report.quarantined} <= set(admins)
    assert len(make_store(keep_quarantined=3).recover("admins").quarantined) == 0  # nothing bad now
    _garbage(data_dir / "admins.json")
    make_store(keep_quarantined=3).load("admins")
    assert len([n for n in quarantined(data_dir) if n.startswith("admins")]) == 3


def test_a_quarantined_copy_that_cannot_be_pruned_never_fails_the_load(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """Pruning is housekeeping: an old entry that cannot be deleted (here a directory: root
    deletes through permissions) stays, and the recovery goes on."""
    seed_history(make_store())
    stuck = data_dir / "quarantine" / "admins-20000101T000000.000000.json"
    stuck.mkdir(parents=True)
    (stuck / "inside").write_text("x")
    _garbage(data_dir / "admins.json")
    store = make_store(keep_quarantined=1)
    assert store.load("admins") == V2
    assert stuck.exists() and len(quarantined(data_dir)) == 2


async def test_service_health_is_not_ok_while_an_alert_stands(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """health() names the file that fell back to defaults and reports not ok."""
    seed_history(make_store())
    _garbage(data_dir / "admins.json")
    _garbage(data_dir / "admins.json.bak")
    for backup in (data_dir / "backups").glob("admins-*.json"):
        _empty(backup)
    service = DataStoreService(make_store())
    await service.start()
    health = service.health()
    assert health["ok"] is False
    assert health["alerts"] == ["admins"]
    assert health["files"]["admins"]["source"] == "defaults"
    assert health["files"]["maintenance"]["alert"] is False


def test_first_start_with_nothing_on_disk_is_defaults_without_alert(
    make_store: Callable[..., DataStore], data_dir: Path, events: Events
) -> None:
    """A brand-new data directory yields the defaults quietly and creates the files."""
    store = make_store()
    for spec in default_specs():
        assert store.load(spec.name) == spec.default()
        assert (data_dir / f"{spec.name}.json").exists()
    assert store.alerts() == []
    assert events == []
    assert all(s.source == "defaults" and not s.alert for s in store.status().values())


def test_the_store_creates_its_directories_private_and_leaves_existing_ones_alone(
    make_store: Callable[..., DataStore], data_dir: Path, tmp_path: Path
) -> None:
    """DATA_DIR, backups/ and quarantine/ are created with mode 0700 (the umask is the usual 022);
    a directory that already exists keeps its mode (load_config warns about it instead)."""
    old_umask = os.umask(0o022)
    try:
        seed_history(make_store())
        _garbage(data_dir / "admins.json")
        make_store().load("admins")
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o750)
        DataStore(shared).load("admins")
    finally:
        os.umask(old_umask)
    for directory in (data_dir, data_dir / "backups", data_dir / "quarantine"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    assert shared.stat().st_mode & 0o777 == 0o750


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=300), name=st.sampled_from(DEFAULT_FILES), with_history=st.booleans())
def test_random_bytes_as_file_never_crash_the_load_and_yield_a_valid_state(
    content: bytes, name: str, with_history: bool
) -> None:
    """Whatever bytes the file holds, load returns state the validator accepts."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        store = DataStore(data_dir)
        if with_history:
            store.load(name)
            store.save(name, store.load(name))
        (data_dir / f"{name}.json").write_bytes(content)
        fresh = DataStore(data_dir)
        state = fresh.load(name)
        assert fresh.check(name, state) == []
        status = fresh.status()[name]
        if with_history:
            assert status.source in ("file", "bak") and not status.alert
        else:
            # A bad file with nothing to restore from is an alert; only a valid file is not.
            assert (status.source, status.alert) in [("file", False), ("defaults", True)]


def test_random_json_text_that_parses_is_served_only_when_valid() -> None:
    """A JSON document that parses but breaks the schema is never served from the file."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        (data_dir / "admins.json").write_text('{"user_ids": [NaN]}')
        store = DataStore(data_dir)
        assert store.load("admins") == V0
        assert store.status()["admins"].source == "defaults"


# --- validation -----------------------------------------------------------------------------


INVALID = [
    ("maintenance", {"enabled": 1, "message": None, "since": None, "by": None}, "enabled"),
    ("maintenance", {"enabled": True, "message": 3, "since": None, "by": None}, "message"),
    ("maintenance", {"enabled": True, "message": None, "since": True, "by": None}, "since"),
    ("maintenance", {"enabled": True, "message": None, "since": None}, "missing key 'by'"),
    ("maintenance", {"enabled": True, "message": None, "since": None, "by": None, "x": 1}, "unknown key"),
    ("maintenance", [], "expected an object"),
    ("guild_settings", {"guilds": {"abc": {}}}, "digits"),
    ("guild_settings", {"guilds": {"1": {"chat_channels": [True]}}}, "chat_channels"),
    ("guild_settings", {"guilds": {"1": {"chat_channels": "5"}}}, "chat_channels"),
    ("guild_settings", {"guilds": {"1": {"persona": 5}}}, "persona"),
    ("guild_settings", {"guilds": {"1": {"user_rate_per_minute": 1.5}}}, "user_rate_per_minute"),
    ("guild_settings", {"guilds": {"1": {"colour": "red"}}}, "unknown key"),
    ("guild_settings", {"guilds": []}, "expected an object"),
    ("admins", {"user_ids": [1, "2"]}, "user_ids"),
    ("admins", {"user_ids": [False]}, "user_ids"),
    ("admins", {}, "missing key"),
    ("breakers", {"overrides": {"gemini": {"state": "half", "until": None, "reason": ""}}}, "state"),
    ("breakers", {"overrides": {"gemini": {"state": "open", "until": "soon", "reason": ""}}}, "until"),
    ("breakers", {"overrides": {"gemini": {"state": "open", "until": None}}}, "missing key 'reason'"),
    ("breakers", {"overrides": {"gemini": {"state": "open", "until": 1.0, "reason": None}}}, "reason"),
    ("admins", {"user_ids": [1], "extra": {1, 2}}, "unknown key"),
]

VALID = [
    ("maintenance", {"enabled": True, "message": "back soon", "since": 1_700_000_000, "by": "ops"}),
    ("guild_settings", {"guilds": {"1": {"chat_channels": [5], "persona": None, "user_rate_per_minute": 3}}}),
    ("guild_settings", {"guilds": {"123": {"persona": "pirate"}}}),
    ("admins", {"user_ids": [42]}),
    ("breakers", {"overrides": {"gemini": {"state": "open", "until": 1.5, "reason": "quota"}}}),
]


@pytest.mark.parametrize(("name", "data", "fragment"), INVALID)
def test_invalid_save_raises_with_the_problems_and_writes_nothing(
    make_store: Callable[..., DataStore], data_dir: Path, name: str, data: Any, fragment: str
) -> None:
    """An invalid save names its problems and leaves file, .bak and backups untouched."""
    store = make_store()
    store.load(name)
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    with pytest.raises(DataStoreValidationError) as info:
        store.save(name, data)
    assert info.value.name == name
    assert any(fragment in problem for problem in info.value.problems), info.value.problems
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("name", "data"), VALID)
def test_valid_save_round_trips_across_a_restart(
    make_store: Callable[..., DataStore], name: str, data: dict[str, Any]
) -> None:
    """What was saved is what the next process loads, from the file."""
    make_store().save(name, data)
    store = make_store()
    assert store.load(name) == data
    assert store.status()[name].source == "file"


def test_unserialisable_data_is_rejected(make_store: Callable[..., DataStore]) -> None:
    """NaN passes a type check but is not JSON: the save is refused."""
    with pytest.raises(DataStoreValidationError, match="JSON"):
        make_store().save("maintenance", {"enabled": True, "message": None, "since": math.nan, "by": None})


def test_unknown_name_is_an_error_naming_the_valid_ones(make_store: Callable[..., DataStore]) -> None:
    with pytest.raises(UnknownFileError) as info:
        make_store().load("nope")
    assert info.value.known == DEFAULT_FILES


def test_load_returns_a_copy_callers_cannot_corrupt_the_cache(make_store: Callable[..., DataStore]) -> None:
    store = make_store()
    store.load("admins")["user_ids"].append("junk")
    assert store.load("admins") == V0


def test_validate_reports_each_file_on_disk_without_changing_it(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """validate() flags the bad file, leaves it in place, and treats a fresh missing file as fine."""
    seed_history(make_store())
    _garbage(data_dir / "admins.json")
    reports = {r.name: r for r in make_store().validate()}
    assert reports["admins"].ok is False and "not JSON" in reports["admins"].problems[0]
    assert reports["maintenance"].ok is True  # never created: a fresh start
    assert (data_dir / "admins.json").read_bytes().startswith(b"\x00")
    assert quarantined(data_dir) == []
    (data_dir / "admins.json").unlink()
    (report,) = make_store().validate("admins")
    assert report.ok is False and report.problems == ["missing"]  # history exists to restore from


# --- backups and serialisation ----------------------------------------------------------------


def test_backup_rotation_keeps_the_newest_n_previous_versions(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """After ten saves with keep_backups=3, the three most recent superseded versions remain."""
    store = make_store(keep_backups=3)
    for i in range(1, 11):
        store.save("admins", {"user_ids": [i]})
    infos = store.list_backups("admins")
    assert len(infos) == 3 == len(list((data_dir / "backups").glob("admins-*.json")))
    assert [json.loads(i.path.read_text()) for i in infos] == [{"user_ids": [n]} for n in (9, 8, 7)]
    assert all(i.valid and i.size > 0 for i in infos)
    assert infos[0].created_at > infos[1].created_at > infos[2].created_at
    assert json.loads((data_dir / "admins.json.bak").read_text()) == {"user_ids": [9]}
    assert not list(data_dir.rglob("*.tmp"))


def test_backup_names_are_utc_timestamps_from_the_injected_clock(
    make_store: Callable[..., DataStore], data_dir: Path, fake_clock: FakeClock
) -> None:
    store = make_store()
    store.load("admins")
    store.save("admins", V1)
    (info,) = store.list_backups("admins")
    assert info.path.name == "admins-20231114T221320.000000.json"  # FakeClock wall start 1_700_000_000
    assert info.created_at == pytest.approx(fake_clock.time())


def test_concurrent_thread_saves_serialise_every_version_enters_the_history_once(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """40 saves from 8 threads: each superseded version is backed up exactly once, none lost."""
    store = make_store(keep_backups=100)
    store.load("admins")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: store.save("admins", {"user_ids": [i]}), range(1, 41)))
    history = [json.loads(i.path.read_text())["user_ids"] for i in store.list_backups("admins")]
    final = json.loads((data_dir / "admins.json").read_text())["user_ids"]
    seen = sorted(tuple(v) for v in [*history, final])
    assert seen == sorted([(), *((i,) for i in range(1, 41))])


async def test_concurrent_async_updates_lose_no_write(make_store: Callable[..., DataStore]) -> None:
    """30 concurrent read-modify-write updates through the service all land."""
    service = DataStoreService(make_store())
    await service.start()

    async def add(i: int) -> None:
        await service.update("admins", lambda d: d["user_ids"].append(i))

    await asyncio.gather(*(add(i) for i in range(1, 31)))
    assert sorted((await service.get("admins"))["user_ids"]) == list(range(1, 31))


# --- the service ------------------------------------------------------------------------------


class RecordingBreaker:
    """A pass-through breaker that records what it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, fn: Any, /, *args: Any, timeout: float | None = None) -> Any:
        self.calls.append(getattr(args[0], "__name__", "?") if args else fn.__name__)
        return await fn(*args)


async def test_service_start_loads_every_file_and_reports_healthy(
    make_store: Callable[..., DataStore],
) -> None:
    service = DataStoreService(make_store())
    assert service.name == "datastore" and service.depends_on == ()
    assert service.health()["ok"] is False  # not started
    await service.start()
    health = service.health()
    assert health["ok"] is True and health["alerts"] == []
    assert set(health["files"]) == set(DEFAULT_FILES)
    assert all(f["loaded"] for f in health["files"].values())
    await service.stop()
    assert service.health()["ok"] is False


async def test_service_runs_disk_work_through_the_breaker_but_not_caller_mistakes(
    make_store: Callable[..., DataStore],
) -> None:
    """Loads and saves go through the breaker; invalid data is refused before reaching it."""
    breaker = RecordingBreaker()
    service = DataStoreService(make_store(), breaker=breaker)
    await service.start()
    await service.save("admins", V1)
    assert breaker.calls == ["load"] * 4 + ["save"]
    with pytest.raises(DataStoreValidationError):
        await service.save("admins", {"user_ids": "x"})
    with pytest.raises(DataStoreValidationError):
        await service.update("admins", lambda d: {"user_ids": "x"})
    with pytest.raises(UnknownFileError):
        await service.get("nope")
    assert breaker.calls == ["load"] * 4 + ["save", "load"]
    assert await service.get("admins") == V1


async def test_service_open_breaker_rejects_without_touching_the_disk(
    make_store: Callable[..., DataStore], fake_clock: FakeClock, data_dir: Path
) -> None:
    """With the real breaker forced open, calls raise CircuitOpenError and nothing is written."""
    breaker = Breaker("datastore", fake_clock)
    service = DataStoreService(make_store(), breaker=breaker)
    await service.start()
    before = (data_dir / "admins.json").read_bytes()
    breaker.force_open(30)
    with pytest.raises(CircuitOpenError):
        await service.save("admins", V1)
    assert (data_dir / "admins.json").read_bytes() == before


async def test_service_recover_validate_and_list_backups(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    service = DataStoreService(make_store())
    await service.start()
    await service.save("admins", V1)
    await service.save("admins", V2)
    _garbage(data_dir / "admins.json")
    assert [r.ok for r in await service.validate("admins")] == [False]
    report = await service.recover("admins")
    assert (report.source, report.alert, len(report.quarantined)) == ("bak", False, 1)
    assert await service.get("admins") == V1
    assert len(await service.list_backups("admins")) == 2


# --- the CLI ----------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    return cli_main(["--env-file", os.devnull, *argv])


def test_cli_validate_is_0_when_valid_and_1_when_any_file_is_invalid(
    make_store: Callable[..., DataStore], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_history(make_store())
    assert run_cli("datastore", "validate", "--data-dir", str(data_dir)) == 0
    assert "All files valid." in capsys.readouterr().out
    _invalid_json_schema(data_dir / "admins.json")
    assert run_cli("datastore", "validate", "--data-dir", str(data_dir)) == 1
    out = capsys.readouterr().out
    assert "admins" in out and "INVALID" in out and "user_ids" in out
    assert run_cli("datastore", "validate", "maintenance", "--data-dir", str(data_dir)) == 0


def test_cli_recover_is_0_from_a_backup_and_2_when_only_defaults_remain(
    make_store: Callable[..., DataStore], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_history(make_store())
    _garbage(data_dir / "admins.json")
    _garbage(data_dir / "admins.json.bak")
    assert run_cli("datastore", "recover", "admins", "--data-dir", str(data_dir)) == 0
    out = capsys.readouterr().out
    assert "served from backup:admins-" in out and "moved aside" in out
    assert make_store().load("admins") == V2

    empty_dir = data_dir.parent / "empty"
    assert run_cli("datastore", "recover", "admins", "--data-dir", str(empty_dir)) == 2
    assert "only the defaults" in capsys.readouterr().out


def test_cli_backups_lists_each_backup_with_validity(
    make_store: Callable[..., DataStore], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_history(make_store())
    _empty(max((data_dir / "backups").glob("admins-*.json")))
    assert run_cli("datastore", "backups", "admins", "--data-dir", str(data_dir)) == 0
    out = capsys.readouterr().out
    assert "admins: 3 backup(s)" in out and out.count("INVALID") == 1 and out.count(" valid ") == 2


def test_cli_unknown_name_is_2_with_the_valid_names(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("datastore", "validate", "nope", "--data-dir", str(data_dir)) == 2
    err = capsys.readouterr().err
    assert "nope" in err and all(name in err for name in DEFAULT_FILES)
    assert not data_dir.exists()


def test_cli_runs_as_python_m_bot_and_reads_data_dir_from_the_environment(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """The real entry point, as an operator runs it with the bot stopped; DATA_DIR picks the store."""
    seed_history(make_store())
    _truncate(data_dir / "admins.json")
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "bot", "--env-file", os.devnull, "datastore"]
    opts: dict[str, Any] = {"cwd": REPO, "env": env, "capture_output": True, "text": True, "timeout": 30}
    done = subprocess.run([*cmd, "validate"], **opts)
    assert done.returncode == 1, done.stderr
    assert "INVALID" in done.stdout
    done = subprocess.run([*cmd, "recover", "admins"], **opts)
    assert done.returncode == 0, done.stderr
    assert "admins           served from bak" in done.stdout
    assert make_store().load("admins") == V2


def test_a_failing_event_listener_does_not_break_recovery(data_dir: Path) -> None:
    """A buggy on_event listener is logged, and the recovered state is still served."""
    seed_history(DataStore(data_dir))
    _garbage(data_dir / "admins.json")

    def broken(kind: str, payload: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    store = DataStore(data_dir, on_event=broken)
    assert store.load("admins") == V2
    assert store.status()["admins"].source == "bak"


def test_file_names_that_would_break_paths_or_backup_names_are_refused(data_dir: Path) -> None:
    spec = default_specs()[0]
    with pytest.raises(ValueError, match="letters, digits"):
        DataStore(data_dir, [type(spec)("bad-name", spec.default, spec.validate)])


async def test_service_runs_under_the_real_registry(make_store: Callable[..., DataStore]) -> None:
    """The registry starts it, reports it healthy with per-file detail, and stops it."""
    registry = ServiceRegistry([DataStoreService(make_store())])
    await registry.start_all()
    health = registry.health()
    assert health["ok"] is True
    assert set(health["services"]["datastore"]["files"]) == set(DEFAULT_FILES)
    await registry.stop_all()
    assert registry.health()["ok"] is False


async def test_peek_returns_the_last_committed_state_without_io(
    make_store: Callable[..., DataStore], data_dir: Path
) -> None:
    """peek() is None before start, then follows every committed save, even if the disk changes under it."""
    service = DataStoreService(make_store())
    assert service.peek("admins") is None
    await service.start()
    assert service.peek("admins") == V0
    await service.save("admins", V1)
    _garbage(data_dir / "admins.json")
    peeked = service.peek("admins")
    assert peeked == V1
    peeked["user_ids"].append(99)  # a private copy
    assert service.peek("admins") == V1
    with pytest.raises(UnknownFileError):
        service.peek("nope")
