"""The health assessment, alerts and incidents on a real application (SQLite file, FakeClock).

No Discord here: destinations are fakes of the ``Destination`` protocol, the presence a recorder;
the real bot against the emulators is ``tests/integration/test_operations_speak_up.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.alerts import (
    RULES,
    Alerter,
    ChannelDestination,
    Destination,
    Firing,
    Thresholds,
    breaker_open,
    title_of,
)
from bot.app import Application, build_application
from bot.health import Facts, HealthMonitor
from bot.incidents import IncidentTracker, summarise
from resilience.breakers import BreakerState
from resilience.clock import FakeClock
from resilience.degradation import ItemKind, ItemState, Mode
from services.config import load_config
from services.storage import IncidentRecord


class FakeDestination:
    """Takes what it is given (``up``) or refuses it; records every message it took."""

    kind = "channel"

    def __init__(self, key: str = "fake") -> None:
        self.key = key
        self.up = True
        self.messages: list[str] = []
        self.calls = 0

    async def deliver(self, text: str) -> bool:
        self.calls += 1
        if self.up:
            self.messages.append(text)
        return self.up


class FakeAlerter(Alerter):
    """The real alerter with fake destinations."""

    def __init__(self, app: Application, destinations: list[Destination], **kw: object) -> None:
        super().__init__(app, **kw)  # type: ignore[arg-type]
        self._fakes = destinations

    def destinations(self) -> list[Destination]:
        return list(self._fakes)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Application]:
    config = load_config(environ={"DATA_DIR": str(tmp_path / "data")}, env_file=None)
    application = build_application(config, clock=FakeClock(wall_start=1_700_000_000.0))
    await application.storage.start()
    await application.datastore.start()
    yield application
    await application.storage.stop()


async def facts_of(app: Application, **changes: object) -> Facts:
    facts = await HealthMonitor(app).assess()
    return replace(facts, **changes)  # type: ignore[arg-type]


def lines(messages: list[str]) -> list[str]:
    return [line for message in messages for line in message.splitlines()]


# --- alerts --------------------------------------------------------------------------------------


async def test_an_alert_fires_once_repeats_at_its_interval_and_resolves_once(app: Application) -> None:
    dest = FakeDestination()
    alerter = FakeAlerter(app, [dest])
    clock = app.clock
    assert isinstance(clock, FakeClock)
    down = await facts_of(app, open_for={"gemini": 120.0})
    for _ in range(3):
        await alerter.evaluate(replace(down, at=clock.time()))
        clock.advance(30.0)
    assert [line for line in lines(dest.messages) if "gemini" in line] == [
        "\N{LARGE RED CIRCLE} **Alert: breaker gemini open**: open for 2 min"
    ]
    clock.advance(3600.0)
    await alerter.evaluate(replace(down, at=clock.time()))
    assert "Still firing: breaker gemini open" in lines(dest.messages)[-1]
    healed = await facts_of(app)
    for _ in range(3):
        clock.advance(30.0)
        await alerter.evaluate(replace(healed, at=clock.time()))
    got = lines(dest.messages)
    assert len(got) == 3 and "Resolved: breaker gemini open" in got[-1]
    assert alerter.firing() == []


async def test_one_message_per_destination_per_assessment_however_many_alerts(app: Application) -> None:
    dest = FakeDestination()
    alerter = FakeAlerter(app, [dest])
    facts = await facts_of(
        app,
        open_for={"gemini": 99.0, "discord.send": 99.0, "storage": 99.0},
        storage_problem="storage failing (3 operations in a row)",
        datastore_defaults=("admins",),
        disabled_tasks=("drain",),
        rss_bytes=2**40,
        recent_messages=100.0,
        recent_errors=90.0,
        dead_letters_last_hour=4.0,
    )
    await alerter.evaluate(facts)
    assert dest.calls == 1 and len(dest.messages) == 1
    assert len(lines(dest.messages)) == 9  # 3 breakers + 6 other rules (not the queue's), in one digest
    assert {a["rule"] for a in alerter.firing()} == {
        "breaker_open", "storage_errors", "datastore_defaults", "task_disabled", "memory", "error_rate",
        "dead_letters",
    }


async def test_a_refusing_destination_keeps_its_lines_and_gets_them_later_without_repeating_the_others(
    app: Application,
) -> None:
    up, down = FakeDestination("up"), FakeDestination("down")
    down.up = False
    alerter = FakeAlerter(app, [up, down])
    facts = await facts_of(app, open_for={"gemini": 99.0})
    await alerter.evaluate(facts)
    assert len(up.messages) == 1 and down.messages == [] and alerter.pending() == 1
    assert await app.storage.alert_states() == []  # not every destination has it: not saved yet
    down.up = True
    await alerter.evaluate(replace(facts, at=facts.at + 30))
    assert len(up.messages) == 1  # told once
    assert lines(down.messages) == lines(up.messages)
    assert [s.key for s in await app.storage.alert_states()] == ["breaker_open:gemini"]


async def test_alert_states_survive_a_restart_no_early_repeat_and_the_resolution_is_told(
    app: Application,
) -> None:
    first = FakeDestination()
    facts = await facts_of(app, open_for={"gemini": 99.0})
    await FakeAlerter(app, [first]).evaluate(facts)
    again = FakeDestination()
    restarted = FakeAlerter(app, [again])
    await restarted.load()
    await restarted.evaluate(replace(facts, at=facts.at + 60))
    assert again.messages == []  # still firing, told a minute ago: not again
    await restarted.evaluate(replace(await facts_of(app), at=facts.at + 120))
    assert "Resolved: breaker gemini open" in lines(again.messages)[-1]
    assert await app.storage.alert_states() == []


class StubChannel(ChannelDestination):
    """A channel destination whose channel is a stub that records what is posted to it."""

    def __init__(self, app: Application, channel_id: int) -> None:
        super().__init__(app, channel_id)
        self.posted: list[str] = []

    async def _target(self) -> Any:
        posted = self.posted

        class Stub:
            id = self.channel_id

            async def send(self, content: str, **kwargs: object) -> None:
                posted.append(content)

        return Stub()


async def test_a_channel_alert_discord_refuses_waits_in_the_durable_queue_and_later_ones_queue_behind(
    app: Application,
) -> None:
    """discord.send open: the message becomes an outbound item the drain delivers (a notice, flagged
    as an alert, not an accepted message); the next one queues behind it instead of overtaking."""

    app.board["discord.send"].force_open(600.0, reason="test")
    channel = StubChannel(app, 42)
    posted = channel.posted
    assert await channel.deliver("first") is True
    app.board["discord.send"].reset()
    assert await channel.deliver("second") is True  # Discord is back, but "first" still waits
    items = await app.storage.list(ItemState.PENDING)
    assert [(i.kind, i.payload["chunks"]) for i in items] == [(ItemKind.OUTBOUND, ["first"]),
                                                              (ItemKind.OUTBOUND, ["second"])]
    assert all(i.payload["notice"] and i.payload["alert"] for i in items)
    assert {i.conversation_key for i in items} == {"alerts:channel:42"}
    assert await app.storage.availability(now=app.clock.time()) == []
    assert posted == []


def test_the_breaker_rule_names_the_cause_and_waits_for_its_threshold() -> None:
    facts = Facts(
        at=0.0, breakers=(), open_for={"gemini": 59.0}, queue=None, storage_problem=None,
        datastore_defaults=(), disabled_tasks=(), rss_bytes=None, recent_messages=0, recent_errors=0,
        dead_letters_last_hour=0, mode=None, availability=None,  # type: ignore[arg-type]
    )
    assert list(breaker_open(facts, Thresholds(breaker_open_seconds=60))) == []
    [firing] = breaker_open(replace(facts, open_for={"gemini": 61.0}), Thresholds(breaker_open_seconds=60))
    assert firing == Firing("breaker_open:gemini", "breaker_open", "breaker gemini open", "open for 61 s")


# --- health: degraded mode and presence ---------------------------------------------------------------


async def test_an_open_breaker_degrades_with_its_reason_and_presence_and_healing_restores_both(
    app: Application,
) -> None:
    shown: list[str | None] = []

    async def presence(text: str | None) -> None:
        shown.append(text)

    monitor = HealthMonitor(app, presence=presence)
    await monitor.run_once()
    assert app.degradation.mode is Mode.NORMAL and shown == []  # nothing to show, nothing sent
    app.board["gemini"].force_open(60.0, reason="quota")
    await monitor.run_once()
    snap = app.degradation.snapshot()
    assert snap.mode is Mode.DEGRADED and snap.reason == "Gemini unavailable"
    assert shown[-1] == "answers delayed: Gemini unavailable"
    await monitor.run_once()
    assert len(shown) == 1  # unchanged: not sent again
    app.board["gemini"].reset()
    await monitor.run_once()
    assert app.degradation.mode is Mode.NORMAL and shown[-1] is None


async def test_maintenance_wins_over_degraded_and_a_failed_presence_is_tried_again(app: Application) -> None:
    shown: list[str | None] = []
    fail = [True]

    async def presence(text: str | None) -> None:
        if fail[0]:
            raise ConnectionError("no gateway session")
        shown.append(text)

    monitor = HealthMonitor(app, presence=presence)
    app.degradation.set(Mode.MAINTENANCE, reason="maintenance", message="back soon")
    app.board["storage"].force_open(60.0)
    await monitor.run_once()
    assert app.degradation.mode is Mode.MAINTENANCE
    fail[0] = False
    await monitor.run_once()
    assert shown == ["under maintenance: messages are saved"]


async def test_an_old_queue_degrades_the_bot(app: Application) -> None:
    clock = app.clock
    assert isinstance(clock, FakeClock)
    await app.storage.enqueue(ItemKind.INBOUND, "c", {"m": 1}, now=clock.time() - 120)
    monitor = HealthMonitor(app)
    await monitor.run_once()
    assert app.degradation.snapshot().reason == "queue backlog (oldest 2 min)"


# --- incidents ---------------------------------------------------------------------------------


def test_mttr_and_mtbf_per_dependency() -> None:
    rows = [
        IncidentRecord("breaker", "gemini", "x", started_at=0, ended_at=60),
        IncidentRecord("breaker", "gemini", "x", started_at=1060, ended_at=1180, queued=5, answered_after=5),
        IncidentRecord("breaker", "gemini", "x", started_at=2180),
        IncidentRecord("breaker", "storage", "x", started_at=10, ended_at=15),
    ]
    by = {row["dependency"]: row for row in summarise(rows)}
    assert by["gemini"]["incidents"] == 3 and by["gemini"]["open"] == 1
    assert by["gemini"]["mttr_seconds"] == 90.0  # (60 + 120) / 2
    assert by["gemini"]["mtbf_seconds"] == 1000.0  # (1060 - 60 + 2180 - 1180) / 2
    assert by["storage"]["mtbf_seconds"] is None and by["gemini"]["queued"] == 5


async def test_a_breaker_episode_is_recorded_kept_while_storage_is_down_and_written_after(
    app: Application,
) -> None:
    tracker = IncidentTracker(app)
    app.board.add_listener(tracker.breaker_listener)
    clock = app.clock
    assert isinstance(clock, FakeClock)
    gemini = app.board["gemini"]
    gemini.force_open(30.0, reason="quota")
    clock.advance(40.0)
    gemini.reset()
    await app.storage.stop()
    facts = await facts_of(app)
    await tracker.update(facts)  # storage down: kept in memory
    report = await tracker.report()
    assert report["stored"] is False and report["incidents"][0]["seconds"] == 40.0
    await app.storage.start()
    await tracker.update(replace(await facts_of(app), at=clock.time()))
    [row] = await app.storage.incidents()
    assert row.ended_at is not None
    assert (row.dependency, row.cause, row.ended_at - row.started_at) == ("gemini", "forced open: quota", 40)
    assert row.settled_at is not None  # the queue was empty
    assert gemini.state is BreakerState.CLOSED


async def test_a_state_taken_up_after_a_restart_gets_the_title_its_rule_gives(app: Application) -> None:
    facts = await facts_of(
        app, open_for={"gemini": 99.0}, storage_problem="x", datastore_defaults=("admins",),
        disabled_tasks=("drain",), rss_bytes=2**40, recent_messages=100.0, recent_errors=90.0,
        dead_letters_last_hour=4.0, queue=None,
    )
    for rule in RULES:
        for firing in rule(facts, Thresholds()):
            assert title_of(firing.key) == firing.title


async def test_alerts_queued_in_the_same_millisecond_are_each_kept(
    app: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queued alert's id is a snowflake of now; two in one millisecond must not share it (their
    dedup key would make the second one find the first, and it was lost)."""
    frozen = discord.utils.utcnow()
    monkeypatch.setattr(discord.utils, "utcnow", lambda: frozen)  # the clock stands still
    app.board["discord.send"].force_open(600.0, reason="test")
    channel = StubChannel(app, 42)
    for n in range(3):
        assert await channel.deliver(f"alert {n}") is True
    items = await app.storage.list(ItemState.PENDING)
    assert [i.payload["chunks"] for i in items] == [["alert 0"], ["alert 1"], ["alert 2"]]
    assert len({i.payload["nonce"] for i in items}) == 3
