"""The operations layer against a real application: real DataStore files, SQLite queue, breakers, mutex.

Each test builds the application the bot builds (``build_application(load_config(...))``) on a
fresh data directory and a ``FakeClock``, starts its service registry, and calls the
operations the admin commands and the HTTP API call. Gemini is the sandbox emulator over
loopback with the real google-genai client; the Discord reconnect test logs a real
``GeminiBot`` in to the Discord emulator. A restart is a second application on the same
data directory after the first one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bot.app import Application, build_application
from bot.operations import (
    HOLD_SECONDS,
    MAX_CHAT_CHANNELS,
    InvalidRequestError,
    Operations,
    OperationUnavailableError,
    UnknownNameError,
    apply_breaker_overrides,
)
from resilience.breakers import BreakerState
from resilience.clock import FakeClock
from resilience.degradation import DEFAULT_MAINTENANCE_MESSAGE, ItemKind, ItemState, Mode
from sandbox.gemini import GeminiEmulator
from services.config import load_config
from services.datastore import validate_guild_settings
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import live_bot

API_KEY = "ops-test-key-do-not-log"


class WakeCounter:
    """Stands in for the drain's ``wake()`` (no drain runs without a bot): counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@contextlib.asynccontextmanager
async def running_app(data_dir: Path, gemini: GeminiEmulator, clock: FakeClock) -> AsyncIterator[Application]:
    """An application on ``data_dir`` with its registry started; stopped on exit."""
    environ = {
        "DATA_DIR": str(data_dir),
        "GEMINI_BASE_URL": gemini.base_url,
        "GEMINI_API_KEY": API_KEY,
        "BREAKER_RESET_SECONDS": "30",
        "HTTP_PORT": "0",
        "LOG_FORMAT": "console",
    }
    app = build_application(load_config(environ=environ, env_file=None), clock=clock)
    await app.registry.start_all()
    try:
        app.reload_settings()
        yield app
    finally:
        await app.registry.stop_all()


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiEmulator]:
    """The Gemini emulator on a loopback port."""
    async with GeminiEmulator(api_key=API_KEY) as emulator:
        yield emulator


@pytest.fixture
async def app(tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock) -> AsyncIterator[Application]:
    """A started application on ``tmp_path/data`` with a ``WakeCounter`` as its drain wake."""
    async with running_app(tmp_path / "data", gemini, fake_clock) as application:
        application.drain_waker = WakeCounter()
        yield application


@pytest.fixture
def ops(app: Application) -> Operations:
    return Operations(app)


def wakes(app: Application) -> int:
    counter = app.drain_waker
    assert isinstance(counter, WakeCounter)
    return counter.calls


def as_json(result: Any) -> str:
    """Results go out as JSON unchanged: strict JSON (no NaN/Infinity) must accept them."""
    return json.dumps(result, allow_nan=False)


# -- circuit breakers ------------------------------------------------------------------------


async def test_circuit_status_lists_every_breaker_with_stable_fields(
    ops: Operations, app: Application
) -> None:
    result = await ops.circuit_status()
    as_json(result)
    names = [row["name"] for row in result["breakers"]]
    assert names == app.board.names()
    assert {"gemini", "storage", "discord.send"} <= set(names)
    gemini = result["breakers"][names.index("gemini")]
    assert gemini == {
        "name": "gemini",
        "state": "closed",
        "since": gemini["since"],
        "failures": 0,
        "remaining": 0.0,
        "last_error": None,
        "forced_reason": None,
        "persisted": False,
        "persisted_until": None,
    }


async def test_unknown_breaker_names_list_the_valid_ones(ops: Operations, app: Application) -> None:
    with pytest.raises(UnknownNameError) as opened:
        await ops.circuit_open("gemnii", 10)
    assert opened.value.kind == "breaker"
    assert opened.value.name == "gemnii"
    assert opened.value.valid == app.board.names()  # "all" cannot be opened
    assert "gemini" in str(opened.value)

    with pytest.raises(UnknownNameError) as reset:
        await ops.circuit_reset("nope")
    assert reset.value.valid == [*app.board.names(), "all"]


async def test_circuit_open_holds_the_breaker_open_and_persists_it(
    ops: Operations, app: Application, fake_clock: FakeClock
) -> None:
    result = await ops.circuit_open("gemini", 600, reason="vendor incident", by="discord:42")
    as_json(result)
    assert result == {
        "name": "gemini",
        "state": "open",
        "duration": 600.0,
        "until": fake_clock.time() + 600,
        "reason": "vendor incident",
    }
    breaker = app.board["gemini"]
    assert breaker.state is BreakerState.OPEN and not breaker.would_admit()
    assert breaker.remaining_open() == pytest.approx(600)
    on_disk = json.loads((app.config.data_dir / "breakers.json").read_text())
    assert on_disk["overrides"]["gemini"] == {
        "state": "open",
        "until": fake_clock.time() + 600,
        "reason": "vendor incident",
    }
    [row] = [r for r in (await ops.circuit_status())["breakers"] if r["name"] == "gemini"]
    assert row["persisted"] and row["persisted_until"] == fake_clock.time() + 600
    assert row["forced_reason"] == "vendor incident"


async def test_circuit_open_is_reapplied_after_a_restart_and_expired_openings_are_dropped(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    data = tmp_path / "data"
    async with running_app(data, gemini, fake_clock) as first:
        await Operations(first).circuit_open("gemini", 600)
        await Operations(first).circuit_open("discord.send", 60)
    fake_clock.advance(100)  # the bot is down for 100 s

    async with running_app(data, gemini, fake_clock) as second:
        assert second.board["gemini"].state is BreakerState.CLOSED  # nothing re-applied yet
        assert await apply_breaker_overrides(second) == ["gemini"]
        assert second.board["gemini"].state is BreakerState.OPEN
        assert second.board["gemini"].remaining_open() == pytest.approx(500)
        assert second.board["discord.send"].state is BreakerState.CLOSED
        overrides = (await second.datastore.get("breakers"))["overrides"]
        assert list(overrides) == ["gemini"]  # the expired opening was removed from the file


async def test_circuit_open_without_a_duration_holds_until_reset_across_restarts(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    data = tmp_path / "data"
    async with running_app(data, gemini, fake_clock) as first:
        result = await Operations(first).circuit_open("gemini")
        assert result["duration"] is None and result["until"] is None
    fake_clock.advance(7 * 86400)

    async with running_app(data, gemini, fake_clock) as second:
        ops = Operations(second)
        await apply_breaker_overrides(second)
        assert second.board["gemini"].remaining_open() == pytest.approx(HOLD_SECONDS)
        [row] = [r for r in (await ops.circuit_status())["breakers"] if r["name"] == "gemini"]
        assert row["state"] == "open" and row["remaining"] is None and row["persisted_until"] is None
        second.drain_waker = WakeCounter()
        reset = await ops.circuit_reset("gemini", by="http")
        assert reset == {"reset": ["gemini"], "overrides_removed": ["gemini"]}
        assert second.board["gemini"].state is BreakerState.CLOSED
        assert wakes(second) == 1

    async with running_app(data, gemini, fake_clock) as third:
        assert await apply_breaker_overrides(third) == []
        assert third.board["gemini"].state is BreakerState.CLOSED


@pytest.mark.parametrize("duration", [0, -5, float("nan"), float("inf"), "60", True])
async def test_circuit_open_refuses_a_bad_duration_and_changes_nothing(
    ops: Operations, app: Application, duration: Any
) -> None:
    with pytest.raises(InvalidRequestError):
        await ops.circuit_open("gemini", duration)
    assert app.board["gemini"].state is BreakerState.CLOSED
    assert (await app.datastore.get("breakers"))["overrides"] == {}


async def test_circuit_reset_all_closes_every_breaker_and_wakes_the_drain(
    ops: Operations, app: Application
) -> None:
    await ops.circuit_open("gemini", 60)
    app.board["storage"].force_open(30)  # opened by failures, not by an operator: nothing on file
    result = await ops.circuit_reset("all")
    assert result == {"reset": app.board.names(), "overrides_removed": ["gemini"]}
    assert all(b.state is BreakerState.CLOSED for b in app.board)
    assert wakes(app) == 1


async def test_status_views_and_a_reset_work_while_the_storage_breaker_is_open(
    ops: Operations, app: Application
) -> None:
    """The DataStore writes through the storage breaker: the views must not need it."""
    await ops.circuit_open("gemini", 60)
    await ops.maintenance_on("notice")
    app.board["storage"].force_open(30)
    rows = {row["name"]: row for row in (await ops.circuit_status())["breakers"]}
    assert rows["storage"]["state"] == "open" and rows["gemini"]["persisted"]
    assert (await ops.maintenance_status())["enabled"] is True
    assert await ops.circuit_reset("storage") == {"reset": ["storage"], "overrides_removed": []}
    assert app.board["storage"].state is BreakerState.CLOSED


# -- maintenance -------------------------------------------------------------------------------


async def test_maintenance_on_and_off_switch_the_mode_persist_it_and_record_who(
    ops: Operations, app: Application, fake_clock: FakeClock
) -> None:
    on = await ops.maintenance_on("Upgrading, back at 3pm", by="discord:7")
    as_json(on)
    assert on == {
        "enabled": True,
        "message": "Upgrading, back at 3pm",
        "since": fake_clock.time(),
        "by": "discord:7",
        "mode": "maintenance",
    }
    assert app.maintenance() == "Upgrading, back at 3pm"
    on_disk = json.loads((app.config.data_dir / "maintenance.json").read_text())
    assert on_disk == {
        "enabled": True,
        "message": "Upgrading, back at 3pm",
        "since": fake_clock.time(),
        "by": "discord:7",
    }
    assert await ops.maintenance_status() == on

    fake_clock.advance(60)
    off = await ops.maintenance_off(by="http")
    assert off == {
        "enabled": False,
        "message": None,
        "since": fake_clock.time(),
        "by": "http",
        "mode": "normal",
    }
    assert app.maintenance() is None and app.degradation.mode is Mode.NORMAL
    assert wakes(app) == 1  # what was queued during maintenance is answered now


async def test_maintenance_without_a_message_uses_the_default_notice_and_again_keeps_since(
    ops: Operations, app: Application, fake_clock: FakeClock
) -> None:
    first = await ops.maintenance_on()
    assert first["message"] == DEFAULT_MAINTENANCE_MESSAGE
    fake_clock.advance(30)
    second = await ops.maintenance_on("  new notice  ")
    assert second["message"] == "new notice"
    assert second["since"] == first["since"]


async def test_maintenance_survives_a_restart(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    data = tmp_path / "data"
    async with running_app(data, gemini, fake_clock) as first:
        await Operations(first).maintenance_on("Moving servers", by="discord:7")
    async with running_app(data, gemini, fake_clock) as second:  # starts, then reload_settings()
        assert second.degradation.mode is Mode.MAINTENANCE
        assert second.maintenance() == "Moving servers"
        status = await Operations(second).maintenance_status()
        assert status["enabled"] and status["by"] == "discord:7"


@pytest.mark.parametrize("message", ["x" * 1801, 42])
async def test_maintenance_on_refuses_a_bad_message_and_changes_nothing(
    ops: Operations, app: Application, message: Any
) -> None:
    with pytest.raises(InvalidRequestError):
        await ops.maintenance_on(message)
    assert app.degradation.mode is Mode.NORMAL
    assert (await app.datastore.get("maintenance"))["enabled"] is False


# -- one guild: its maintenance and chat channels ---------------------------------------------------

GUILD, OTHER = 111, 222


async def test_guild_maintenance_covers_only_that_guild_persists_and_records_who(
    ops: Operations, app: Application, fake_clock: FakeClock
) -> None:
    on = await ops.guild_maintenance_on(GUILD, "  Moving house.  ", by="discord:7")
    as_json(on)
    assert on == {
        "guild_id": GUILD,
        "enabled": True,
        "message": "Moving house.",
        "since": fake_clock.time(),
        "by": "discord:7",
        "bot_wide": False,
    }
    assert app.maintenance(GUILD) == "Moving house." and app.guild_maintenance(GUILD) == "Moving house."
    assert app.maintenance(OTHER) is None and app.maintenance() is None  # other guilds, DMs
    assert app.degradation.mode is Mode.NORMAL  # the bot-wide switch is the owners'
    on_disk = json.loads((app.config.data_dir / "guild_settings.json").read_text())
    assert on_disk["guilds"][str(GUILD)]["maintenance"] == {
        "enabled": True, "message": "Moving house.", "since": fake_clock.time(), "by": "discord:7"
    }
    assert await ops.guild_maintenance_status(GUILD) == on
    assert (await ops.guild_maintenance_status(OTHER))["enabled"] is False

    fake_clock.advance(30)
    again = await ops.guild_maintenance_on(GUILD, by="discord:8")
    assert again["message"] == DEFAULT_MAINTENANCE_MESSAGE and again["since"] == on["since"]

    fake_clock.advance(30)
    off = await ops.guild_maintenance_off(GUILD, by="discord:9")
    assert off["enabled"] is False and off["message"] is None
    assert (off["since"], off["by"]) == (fake_clock.time(), "discord:9")
    assert app.maintenance(GUILD) is None
    assert wakes(app) == 1


async def test_guild_maintenance_survives_a_restart(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    data = tmp_path / "data"
    async with running_app(data, gemini, fake_clock) as first:
        await Operations(first).guild_maintenance_on(GUILD, "Moving house.", by="discord:7")
        await Operations(first).guild_chat_channel_add(GUILD, 5, by="discord:7")
    async with running_app(data, gemini, fake_clock) as second:  # starts, then reload_settings()
        assert second.maintenance(GUILD) == "Moving house."
        assert second.maintenance(OTHER) is None and second.maintenance() is None
        assert second.chat_channels(GUILD) == {5}


async def test_the_bot_wide_maintenance_covers_every_guild_and_its_status_says_so(
    ops: Operations, app: Application
) -> None:
    await ops.maintenance_on("Everyone waits.")
    assert app.maintenance(GUILD) == app.maintenance(OTHER) == app.maintenance() == "Everyone waits."
    assert (await ops.guild_maintenance_status(GUILD))["bot_wide"] is True
    await ops.guild_maintenance_on(GUILD, "Only us.")
    assert app.maintenance(GUILD) == "Everyone waits."  # the bot-wide notice wins while it is on
    await ops.maintenance_off()
    assert app.maintenance(GUILD) == "Only us." and app.maintenance(OTHER) is None


async def held(app: Application, guild: int | None, kind: ItemKind = ItemKind.INBOUND) -> int:
    """A pending item of ``guild`` the drain held for its guild's maintenance (due in 600 s)."""
    payload = {"message_id": 1, "channel_id": 9, "guild_id": guild, "author_id": 5, "content": "q"}
    item = await app.storage.enqueue(kind, f"channel:{guild}:{kind.value}", payload, now=app.clock.time())
    [claimed] = await app.storage.claim(now=app.clock.time(), lease_seconds=60, kind=kind, limit=1)
    assert claimed.id == item.id
    await app.storage.requeue(
        item.id, error="guild maintenance", next_attempt_at=app.clock.time() + 600, count_attempt=False
    )
    return item.id


async def test_ending_a_guilds_maintenance_makes_only_its_held_questions_due(
    ops: Operations, app: Application
) -> None:
    ours, theirs, dm = await held(app, GUILD), await held(app, OTHER), await held(app, None)
    answer = await held(app, GUILD, ItemKind.OUTBOUND)
    await ops.guild_maintenance_on(GUILD)
    await ops.guild_maintenance_off(GUILD)
    now = app.clock.time()
    due = {}
    for item_id in (ours, theirs, dm, answer):
        item = await app.storage.get(item_id)
        assert item is not None
        due[item_id] = item.next_attempt_at <= now
    assert due == {ours: True, theirs: False, dm: False, answer: False}


async def test_guild_chat_channels_are_listed_added_and_removed_and_persisted(
    ops: Operations, app: Application
) -> None:
    assert await ops.guild_chat_channels(GUILD) == {"guild_id": GUILD, "channels": [], "changed": False}
    added = await ops.guild_chat_channel_add(GUILD, 30, by="discord:7")
    assert added == {"guild_id": GUILD, "channels": [30], "changed": True}
    assert (await ops.guild_chat_channel_add(GUILD, 30))["changed"] is False
    await ops.guild_chat_channel_add(GUILD, 20)
    assert app.chat_channels(GUILD) == {20, 30} and app.chat_channels(OTHER) == frozenset()
    on_disk = json.loads((app.config.data_dir / "guild_settings.json").read_text())
    assert on_disk["guilds"][str(GUILD)]["chat_channels"] == [20, 30]

    removed = await ops.guild_chat_channel_remove(GUILD, 30)
    assert removed == {"guild_id": GUILD, "channels": [20], "changed": True}
    assert (await ops.guild_chat_channel_remove(GUILD, 30))["changed"] is False
    assert (await ops.guild_chat_channels(GUILD))["channels"] == [20]


async def test_guild_operations_refuse_bad_ids_and_too_many_channels(
    ops: Operations, app: Application
) -> None:
    for bad in (0, -1, True, "111", None):
        with pytest.raises(InvalidRequestError):
            await ops.guild_maintenance_on(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            await ops.guild_chat_channel_add(GUILD, bad)  # type: ignore[arg-type]
    for channel in range(1, MAX_CHAT_CHANNELS + 1):
        await ops.guild_chat_channel_add(GUILD, channel)
    with pytest.raises(InvalidRequestError, match="remove one first"):
        await ops.guild_chat_channel_add(GUILD, 999)
    assert len(app.chat_channels(GUILD)) == MAX_CHAT_CHANNELS
    with pytest.raises(InvalidRequestError):
        await ops.guild_maintenance_on(GUILD, "x" * 1801)
    assert app.maintenance(GUILD) is None


@pytest.mark.parametrize(
    ("maintenance", "problem"),
    [
        ({"enabled": True, "message": None, "since": 1.0, "by": None}, None),
        ({"enabled": "yes", "message": None, "since": 1.0, "by": None}, "maintenance.enabled: expected bool"),
        ({"enabled": True, "message": 5, "since": 1.0, "by": None}, "maintenance.message"),
        ({"enabled": True}, "missing key"),
    ],
)
def test_the_guild_settings_file_checks_a_guilds_maintenance(maintenance: Any, problem: str | None) -> None:
    problems = validate_guild_settings({"guilds": {"111": {"maintenance": maintenance}}})
    if problem is None:
        assert problems == []
    else:
        assert problems and all(p.startswith("guild_settings.guilds['111'].maintenance") for p in problems)
        assert any(problem in p for p in problems), problems


# -- the queue -----------------------------------------------------------------------------------


async def enqueue(app: Application, content: str, channel: int = 1, kind: ItemKind = ItemKind.INBOUND) -> int:
    payload = {"message_id": 1, "channel_id": channel, "guild_id": None, "author_id": 5, "content": content}
    item = await app.storage.enqueue(kind, f"channel:{channel}", payload, now=app.clock.time())
    return item.id


async def test_queue_status_counts_by_kind_and_state_and_previews_only_a_little_content(
    ops: Operations, app: Application, fake_clock: FakeClock
) -> None:
    secret_tail = "the rest of this message stays private"
    await enqueue(app, "a" * 60 + secret_tail, channel=1)
    fake_clock.advance(10)
    await enqueue(app, "short", channel=2)
    await enqueue(app, "answer", channel=3, kind=ItemKind.OUTBOUND)
    fake_clock.advance(5)

    result = await ops.queue_status()
    text = as_json(result)
    assert secret_tail not in text
    assert result["depth"]["inbound"] == {"pending": 2, "claimed": 0, "done": 0, "dead": 0, "expired": 0}
    assert result["depth"]["outbound"]["pending"] == 1
    assert result["pending"] == 3
    assert result["oldest_pending_age"] == 15.0
    first = result["items"][0]
    assert len(first["preview"]) <= 40 and first["preview"].startswith("aaaa")
    assert (first["kind"], first["state"], first["age"], first["attempts"]) == ("inbound", "pending", 15.0, 0)
    assert [i["preview"] for i in result["items"][1:]] == ["short", "answer"]

    assert len((await ops.queue_status(limit=1))["items"]) == 1
    with pytest.raises(InvalidRequestError):
        await ops.queue_status(limit=1000)


async def test_queue_drain_wakes_the_drain_and_says_what_holds_it_back(
    ops: Operations, app: Application
) -> None:
    await enqueue(app, "one")
    await enqueue(app, "two", kind=ItemKind.OUTBOUND)
    app.board["gemini"].force_open(60)
    result = await ops.queue_drain()
    as_json(result)
    assert result == {
        "woken": True,
        "pending": 2,
        "pending_inbound": 1,
        "pending_outbound": 1,
        "oldest_pending_age": 0.0,
        "blocked_by": ["gemini"],
    }
    assert wakes(app) == 1

    app.drain_waker = None  # no bot in this process: nothing to wake, and the result says so
    assert (await ops.queue_drain())["woken"] is False


async def test_queue_purge_deletes_dead_items_and_refuses_live_work(
    ops: Operations, app: Application
) -> None:
    dead = await enqueue(app, "gave up", channel=1)
    live = await enqueue(app, "still waiting", channel=2)
    [claimed] = await app.storage.claim(now=app.clock.time(), lease_seconds=60, limit=1)
    assert claimed.id == dead
    await app.storage.dead_letter(dead, "too many attempts")

    for state in ("pending", "claimed", "everything", 3):
        with pytest.raises(InvalidRequestError) as refused:
            await ops.queue_purge(state)  # type: ignore[arg-type]
        assert "dead, expired, done" in str(refused.value)
    assert (await app.storage.get(live)) is not None

    assert await ops.queue_purge("dead") == {"state": "dead", "purged": 1}
    assert await app.storage.get(dead) is None
    assert await ops.queue_purge("expired") == {"state": "expired", "purged": 0}
    assert [i.id for i in await app.storage.list(ItemState.PENDING)] == [live]


# -- the DataStore -------------------------------------------------------------------------------


async def test_datastore_validate_reports_each_file_and_finds_a_corrupt_one(
    ops: Operations, app: Application
) -> None:
    everything = await ops.datastore_validate()
    as_json(everything)
    assert everything["ok"] is True
    assert [f["name"] for f in everything["files"]] == app.store.names()

    (app.config.data_dir / "admins.json").write_text('{"user_ids": ["not an id"]}')
    one = await ops.datastore_validate("admins")
    assert one["ok"] is False
    [report] = one["files"]
    assert report["name"] == "admins" and not report["ok"]
    assert "user_ids" in report["problems"][0]

    with pytest.raises(UnknownNameError) as unknown:
        await ops.datastore_validate("admin")
    assert unknown.value.kind == "datastore file"
    assert unknown.value.valid == ["maintenance", "guild_settings", "admins", "breakers"]


async def test_datastore_recover_reloads_a_file_and_applies_it_to_the_running_bot(
    ops: Operations, app: Application
) -> None:
    # An operator edits guild_settings.json by hand, then asks the bot to pick it up.
    settings = {"guilds": {"123": {"chat_channels": [456]}}}
    (app.config.data_dir / "guild_settings.json").write_text(json.dumps(settings))
    assert app.chat_channels(123) == frozenset()
    recovered = await ops.datastore_recover("guild_settings", by="http")
    assert recovered == {
        "name": "guild_settings",
        "source": "file",
        "alert": False,
        "problems": [],
        "quarantined": [],
    }
    assert app.chat_channels(123) == {456}

    # A corrupt file is moved aside and the previous good version (the .bak) serves.
    (app.config.data_dir / "guild_settings.json").write_text("{not json")
    recovered = await ops.datastore_recover("guild_settings")
    as_json(recovered)
    assert recovered["source"] == "bak"
    assert len(recovered["quarantined"]) == 1 and "quarantine" in recovered["quarantined"][0]
    assert app.chat_channels(123) == frozenset()  # the .bak held the settings from before the edit

    with pytest.raises(UnknownNameError):
        await ops.datastore_recover("guilds")


async def test_datastore_recover_of_breakers_reapplies_the_openings(
    ops: Operations, app: Application, fake_clock: FakeClock
) -> None:
    overrides = {
        "overrides": {"gemini": {"state": "open", "until": fake_clock.time() + 120, "reason": "edit"}}
    }
    (app.config.data_dir / "breakers.json").write_text(json.dumps(overrides))
    await ops.datastore_recover("breakers")
    assert app.board["gemini"].state is BreakerState.OPEN
    assert app.board["gemini"].remaining_open() == pytest.approx(120)


# -- the mutex ------------------------------------------------------------------------------------


async def test_mutex_status_and_release_free_a_stuck_conversation(ops: Operations, app: Application) -> None:
    holding = asyncio.Event()
    stuck = asyncio.Event()  # never set: the holder is stuck
    got_it = asyncio.Event()

    async def holder() -> None:
        async with app.mutex.acquire("channel:9", 5.0, holder="message 77"):
            holding.set()
            await stuck.wait()

    async def waiter() -> None:
        async with app.mutex.acquire("channel:9", 5.0, holder="drain"):
            got_it.set()

    tasks = [asyncio.create_task(holder())]
    await holding.wait()
    tasks.append(asyncio.create_task(waiter()))
    await asyncio.sleep(0)
    try:
        status = await ops.mutex_status()
        as_json(status)
        assert status["locks"] == [
            {"key": "channel:9", "holder": "message 77", "held_for": 0.0, "waiters": 1}
        ]
        assert status["counters"]["acquisitions"] == 1

        with pytest.raises(UnknownNameError) as unknown:
            await ops.mutex_release("channel:10")
        assert unknown.value.valid == ["channel:9"]

        released = await ops.mutex_release("channel:9", by="discord:7")
        assert released == {
            "key": "channel:9",
            "released": True,
            "holder": "message 77",
            "held_for": 0.0,
            "waiters": 1,
        }
        async with asyncio.timeout(1):
            await got_it.wait()
        assert (await ops.mutex_status())["counters"]["forced_releases"] == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the process ------------------------------------------------------------------------------------


async def test_gc_collects_unreachable_cycles_and_reports_resident_memory(ops: Operations) -> None:
    class Node:
        other: Any = None

    gc.collect()
    for _ in range(50):
        a, b = Node(), Node()
        a.other, b.other = b, a
    del a, b
    result = await ops.gc()
    as_json(result)
    assert result["collected"] >= 100
    assert isinstance(result["rss_before"], int) and result["rss_before"] > 0
    assert isinstance(result["rss_after"], int) and result["rss_after"] > 0


async def test_test_gemini_reports_an_answer_with_its_latency(
    ops: Operations, gemini: GeminiEmulator
) -> None:
    result = await ops.test_gemini()
    as_json(result)
    assert result["ok"] is True
    assert result["reply_kind"] == "answer" and result["model"] == "gemini-2.5-flash"
    assert result["category"] is None and result["breaker"] == "closed"
    assert result["latency_ms"] >= 0
    assert len(gemini.requests) == 1


async def test_test_gemini_classifies_failures_instead_of_raising(
    ops: Operations, app: Application, gemini: GeminiEmulator
) -> None:
    gemini.faults.add("503", count=app.config.retry_max_attempts)
    failed = await ops.test_gemini()
    as_json(failed)
    assert failed["ok"] is False
    assert (failed["category"], failed["retryable"], failed["reply_kind"]) == ("unavailable", True, None)
    assert failed["message"]

    await ops.circuit_open("gemini", 60)
    before = len(gemini.requests)
    rejected = await ops.test_gemini()
    assert (rejected["ok"], rejected["category"], rejected["breaker"]) == (False, "circuit_open", "open")
    assert len(gemini.requests) == before  # the breaker kept the probe from reaching Gemini


async def test_test_gemini_reports_a_refusal_as_not_ok_with_its_kind(
    ops: Operations, gemini: GeminiEmulator
) -> None:
    gemini.faults.add("safety", count=1)
    result = await ops.test_gemini()
    assert (result["ok"], result["reply_kind"], result["category"]) == (False, "safety_blocked", None)
    assert result["message"] and "safety" in result["message"]


async def test_discord_reconnect_without_a_connected_client_is_unavailable(ops: Operations) -> None:
    with pytest.raises(OperationUnavailableError):
        await ops.discord_reconnect()


async def test_discord_reconnect_resumes_the_gateway_session_without_stopping_the_bot(tmp_path: Path) -> None:
    async with running_emulators(heartbeat_interval=1.0) as emus, live_bot(emus, tmp_path / "data") as live:
        discord = emus.discord
        assert (discord.identify_count, discord.resume_count) == (1, 0)

        result = await Operations(live.app).discord_reconnect(by="http")
        assert result == {"closed": True, "code": 4000}
        await discord.wait_until(lambda: discord.resume_count == 1, 10)
        assert discord.identify_count == 1  # resumed, not re-identified
        assert not live.bot.is_closed()
        await discord.wait_connected(5)

        # Still answering after the reconnect.
        sent = await live.say("still there?")
        await live.wait_replies(sent["id"])


# -- logging ---------------------------------------------------------------------------------------


async def test_every_operation_logs_one_admin_line_with_the_actor_and_no_secret(
    ops: Operations, app: Application
) -> None:
    calls = {
        "circuit_status": ops.circuit_status(by="ops"),
        "circuit_open": ops.circuit_open("gemini", 5, by="ops"),
        "circuit_reset": ops.circuit_reset("all", by="ops"),
        "maintenance_on": ops.maintenance_on("notice", by="ops"),
        "maintenance_status": ops.maintenance_status(by="ops"),
        "maintenance_off": ops.maintenance_off(by="ops"),
        "guild_maintenance_on": ops.guild_maintenance_on(GUILD, by="ops"),
        "guild_maintenance_status": ops.guild_maintenance_status(GUILD, by="ops"),
        "guild_maintenance_off": ops.guild_maintenance_off(GUILD, by="ops"),
        "guild_chat_channels": ops.guild_chat_channels(GUILD, by="ops"),
        "guild_chat_channel_add": ops.guild_chat_channel_add(GUILD, 5, by="ops"),
        "guild_chat_channel_remove": ops.guild_chat_channel_remove(GUILD, 5, by="ops"),
        "queue_status": ops.queue_status(by="ops"),
        "queue_drain": ops.queue_drain(by="ops"),
        "queue_purge": ops.queue_purge("done", by="ops"),
        "datastore_validate": ops.datastore_validate(by="ops"),
        "datastore_recover": ops.datastore_recover("admins", by="ops"),
        "mutex_status": ops.mutex_status(by="ops"),
        "gc": ops.gc(by="ops"),
        "test_gemini": ops.test_gemini(by="ops"),
    }
    with capture_logs() as logs:
        for call in calls.values():
            await call
    admin = [entry for entry in logs if entry["event"].startswith("admin.")]
    assert [entry["event"] for entry in admin] == [f"admin.{op}" for op in calls]
    assert all(entry["actor"] == "ops" for entry in admin)
    assert API_KEY not in repr(logs)
