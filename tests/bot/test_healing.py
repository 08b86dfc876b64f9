"""The healer (``bot.healing``) on injected time: each fault healed, the rate bound, the operator left alone.

No Discord and no sleeps: services are small fakes in a real ``ServiceRegistry``, the DataStore is
real (files in ``tmp_path``), the gateway is a probe the test sets, and time is a ``FakeClock``.
The real bot against the emulators is ``tests/integration/test_healing.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.admin import format_healing
from bot.healing import (
    DATASTORE,
    DONE,
    FAILED,
    GATEWAY,
    HELD,
    MEMORY,
    MIB,
    RESTART,
    ActionBudget,
    GatewayReading,
    Healer,
)
from bot.health import Facts
from resilience.breakers import BreakerBoard
from resilience.clock import FakeClock
from resilience.degradation import DegradationState, Mode
from resilience.registry import ServiceRegistry, ServiceState
from services.datastore import DataStore, DataStoreService
from services.http_api import BoundedCache
from services.metrics import Metrics
from tests.clocks import SteppedClock


class Flaky:
    """A service that can die while it runs (``alive`` false) and be told to fail its next starts."""

    depends_on: tuple[str, ...] = ()

    def __init__(self, name: str, depends_on: tuple[str, ...] = ()) -> None:
        self.name = name
        self.depends_on = depends_on
        self.alive = True
        self.starts = 0
        self.stops = 0
        self.failing_starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.failing_starts:
            self.failing_starts -= 1
            raise ConnectionError(f"{self.name} cannot start")
        self.alive = True

    async def stop(self) -> None:
        self.stops += 1

    def health(self) -> dict[str, Any]:
        return {"ok": self.alive, "alive": self.alive}


@dataclass
class Gateway:
    """The gateway probe and reconnect the client gives: a reading the test sets, reconnects counted."""

    reading: GatewayReading | None = None
    reconnects: int = 0

    def probe(self) -> GatewayReading | None:
        return self.reading

    async def reconnect(self) -> None:
        self.reconnects += 1
        self.reading = GatewayReading(silent_for=0.0, heartbeat_interval=1.0)  # a fresh session


@dataclass
class Rig:
    """A healer with its registry, DataStore, breakers, degradation state, gateway and caches."""

    clock: FakeClock
    healer: Healer
    registry: ServiceRegistry
    services: dict[str, Flaky]
    store: DataStore
    board: BreakerBoard
    degradation: DegradationState
    metrics: Metrics
    gateway: Gateway
    trimmed: list[str] = field(default_factory=list)
    collected: list[int] = field(default_factory=list)

    def facts(self, *, rss: int | None = None) -> Facts:
        """What a health assessment would hand the healer now."""
        return Facts(
            at=self.clock.time(), breakers=tuple(self.board.snapshot()), open_for={}, queue=None,
            storage_problem=None, datastore_defaults=tuple(self.store.alerts()), disabled_tasks=(),
            rss_bytes=rss, recent_messages=0, recent_errors=0, dead_letters_last_hour=0,
            mode=self.degradation.snapshot(), availability=None,
        )

    def count(self, kind: str, outcome: str) -> float:
        return self.metrics.healing_actions.labels(kind, outcome)._value.get()

    def outcomes(self, kind: str) -> list[str]:
        return [r.outcome for r in reversed(self.healer.history()) if r.kind == kind]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A started registry (the DataStore, ``storage``, ``api`` depending on it) and a healer on a
    ``FakeClock``, its loop not running (each test calls ``heal`` / ``check_gateway`` itself):
    memory threshold 100 MiB, gateway silence 5 s, at most 3 actions per kind an hour."""
    rig = await make_rig(tmp_path, FakeClock(), with_healer_service=False)
    yield rig
    await rig.registry.stop_all()


async def make_rig(tmp_path: Path, clock: FakeClock, *, with_healer_service: bool) -> Rig:
    """The rig; ``with_healer_service`` registers the healer too, so ``start_all`` starts its loop."""
    metrics = Metrics(process_metrics=False)
    board = BreakerBoard(clock)
    board.add("storage")
    board.add("gemini")
    degradation = DegradationState(clock)
    store = DataStore(tmp_path / "data", keep_backups=3, clock=clock)
    datastore = DataStoreService(store)
    rig_trimmed: list[str] = []
    rig_collected: list[int] = []

    def trim(name: str, n: int) -> BoundedCache:
        def do() -> int:
            rig_trimmed.append(name)
            return n

        return BoundedCache(lambda: n, 100, trim=do)

    caches = {"traces": trim("traces", 7), "messages": trim("messages", 3), "untrimmable": lambda: 5}

    def collect() -> int:
        rig_collected.append(1)
        return 42

    healer = Healer(
        clock=clock, metrics=metrics, board=board, degradation=degradation, datastore=datastore,
        caches=caches, max_per_hour=3, gateway_silence=5.0, memory_bytes=100 * MIB, collect=collect,
        rss=lambda: 90 * MIB,
    )
    services = {"storage": Flaky("storage"), "api": Flaky("api", ("storage",))}
    listed: list[Any] = [datastore, services["storage"], services["api"]]
    registry = ServiceRegistry([*listed, healer] if with_healer_service else listed)
    healer.registry = registry
    gateway = Gateway()
    healer.attach(gateway=gateway.probe, reconnect=gateway.reconnect)
    await registry.start_all()
    rig = Rig(clock, healer, registry, services, store, board, degradation, metrics, gateway)
    rig.trimmed, rig.collected = rig_trimmed, rig_collected
    return rig


# --- restart ---------------------------------------------------------------------------------------


async def test_a_service_that_dies_is_restarted_with_its_dependents_and_the_action_recorded(rig: Rig) -> None:
    storage, api = rig.services["storage"], rig.services["api"]
    storage.alive = False
    await rig.healer.heal(rig.facts())
    assert storage.alive and (storage.stops, storage.starts) == (1, 2)
    assert (api.stops, api.starts) == (1, 2)  # what depends on it went down and came back with it
    assert rig.registry.states()["storage"] is ServiceState.RUNNING
    [record] = rig.healer.history()
    assert (record.kind, record.target, record.outcome) == (RESTART, "storage", DONE)
    assert record.detail == "restarted storage, api"
    assert rig.count(RESTART, DONE) == 1
    await rig.healer.heal(rig.facts())  # healthy now: nothing more to do
    assert len(rig.healer.history()) == 1


async def test_a_restart_whose_start_fails_is_rolled_back_and_recorded_failed_then_retried(rig: Rig) -> None:
    storage, api = rig.services["storage"], rig.services["api"]
    storage.alive = False
    storage.failing_starts = 1
    await rig.healer.heal(rig.facts())
    states = rig.registry.states()
    assert states["storage"] is ServiceState.FAILED and states["api"] is ServiceState.STOPPED
    assert storage.stops == 2  # stopped for the restart, then again to undo the failed start
    assert api.starts == 1  # not started on top of a storage that failed
    [record] = rig.healer.history()
    assert record.outcome == FAILED and "ServiceStartError" in record.detail
    # The next assessment sees it FAILED and restarts it, dependents included.
    await rig.healer.heal(rig.facts())
    states = rig.registry.states()
    assert states["storage"] is ServiceState.RUNNING and states["api"] is ServiceState.RUNNING
    assert rig.outcomes(RESTART) == [FAILED, DONE]


async def test_the_rate_bound_holds_a_fault_that_keeps_coming_back_and_records_the_hold_once(
    rig: Rig,
) -> None:
    """A service that dies again after every restart: 3 restarts an hour, then held, no loop."""
    storage = rig.services["storage"]
    for _ in range(20):
        storage.alive = False
        await rig.healer.heal(rig.facts())
        rig.clock.advance(60)
    assert storage.starts == 1 + 3
    assert rig.outcomes(RESTART) == [DONE, DONE, DONE, HELD]
    assert rig.count(RESTART, DONE) == 3 and rig.count(RESTART, HELD) == 17
    assert rig.healer.report()["kinds"][RESTART]["held"] is True
    # An hour after the first restart one more is allowed; the hold is over.
    rig.clock.advance(3600 - 20 * 60)
    await rig.healer.heal(rig.facts())
    assert storage.starts == 5
    assert rig.outcomes(RESTART)[-1] == DONE and rig.healer.report()["kinds"][RESTART]["held"] is False


def test_the_budget_is_a_sliding_window_per_kind() -> None:
    clock = FakeClock()
    budget = ActionBudget(2, 100.0, clock)
    budget.spend("a")
    clock.advance(50)
    budget.spend("a")
    assert not budget.allows("a") and budget.allows("b")
    assert budget.free_in("a") == 50.0
    clock.advance(50)
    assert budget.allows("a") and budget.used("a") == 1


async def test_maintenance_mode_keeps_the_healer_off_everything(rig: Rig) -> None:
    rig.degradation.set(Mode.MAINTENANCE, reason="maintenance")
    rig.services["storage"].alive = False
    rig.gateway.reading = GatewayReading(silent_for=30.0, heartbeat_interval=1.0)
    await rig.healer.heal(rig.facts(rss=500 * MIB))
    await rig.healer.check_gateway()
    assert rig.healer.history() == [] and rig.gateway.reconnects == 0 and not rig.collected
    assert rig.services["storage"].starts == 1


async def test_a_breaker_an_operator_holds_open_keeps_the_healer_off_its_service(rig: Rig) -> None:
    rig.services["storage"].alive = False
    rig.board.get("storage").force_open(reason="operator: disk replaced")
    await rig.healer.heal(rig.facts())
    assert rig.services["storage"].starts == 1 and rig.healer.history() == []
    # A breaker that opened by itself (failures) is no operator's: the healer acts.
    breaker = rig.board.get("storage")
    breaker.reset()
    while breaker.snapshot().state.value == "closed":
        breaker.admit().record_failure(ConnectionError("down"))
    assert breaker.snapshot().forced_reason is None
    await rig.healer.heal(rig.facts())
    assert rig.services["storage"].starts == 2


# --- the DataStore ---------------------------------------------------------------------------------


async def test_a_file_corrupted_on_disk_is_recovered_from_its_backup(rig: Rig) -> None:
    service = rig.registry.get("datastore")
    assert isinstance(service, DataStoreService)
    await service.save("admins", {"user_ids": [1]})
    await service.save("admins", {"user_ids": [1, 2]})  # the .bak now holds [1]
    path = rig.store.path("admins")
    path.write_text('{"user_ids": [1, 2')  # torn write
    await rig.healer.heal(rig.facts())
    [record] = rig.healer.history()
    assert (record.kind, record.target, record.outcome) == (DATASTORE, "admins", DONE)
    assert record.detail == "recovered from bak" and "not JSON" in record.reason
    assert json.loads(path.read_text()) == {"user_ids": [1]}
    assert [r.ok for r in rig.store.validate("admins")] == [True]
    assert list((rig.store.quarantine_dir).iterdir())  # the damaged copy is kept aside
    await rig.healer.heal(rig.facts())
    assert len(rig.healer.history()) == 1  # valid again: nothing more to do


async def test_a_file_whose_every_copy_on_disk_is_damaged_comes_back_from_the_state_last_committed(
    rig: Rig,
) -> None:
    service = rig.registry.get("datastore")
    assert isinstance(service, DataStoreService)
    await service.save("admins", {"user_ids": [1]})
    rig.store.path("admins").write_text("garbage")
    rig.store.bak_path("admins").write_text("garbage")
    for backup in rig.store.backup_dir.iterdir():
        backup.write_text("garbage")
    # The running process still holds its last committed state: that serves (source "memory").
    await rig.healer.heal(rig.facts())
    assert rig.healer.history()[0].detail == "recovered from memory"
    assert json.loads(rig.store.path("admins").read_text()) == {"user_ids": [1]}


# --- the gateway -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("silent_for", "interval", "reconnects"),
    [
        (4.9, 1.0, 0),  # within HEAL_GATEWAY_SILENCE_SECONDS (5)
        (5.0, 1.0, 1),  # silent that long: reconnected
        (30.0, 41.25, 0),  # Discord's interval: a quiet healthy connection hears only an ACK per 41 s
        (44.3, 41.25, 1),  # an interval plus the ACK's grace without a frame: a zombie
    ],
)
async def test_a_silent_gateway_is_reconnected_after_the_silence_limit_and_not_before(
    rig: Rig, silent_for: float, interval: float, reconnects: int
) -> None:
    rig.gateway.reading = GatewayReading(silent_for=silent_for, heartbeat_interval=interval)
    await rig.healer.check_gateway()
    assert rig.gateway.reconnects == reconnects
    if reconnects:
        [record] = rig.healer.history()
        assert (record.kind, record.outcome) == (GATEWAY, DONE)
        assert f"{silent_for:.1f} s" in record.reason


async def test_the_gateway_is_left_to_discord_py_when_its_own_timeout_comes_first(rig: Rig) -> None:
    rig.gateway.reading = GatewayReading(silent_for=59.0, heartbeat_interval=58.0)
    await rig.healer.check_gateway()
    assert rig.gateway.reconnects == 0


async def test_no_session_to_judge_means_no_reconnect(rig: Rig) -> None:
    rig.gateway.reading = None
    await rig.healer.check_gateway()
    assert rig.gateway.reconnects == 0 and rig.healer.history() == []


async def test_a_gateway_that_stays_silent_is_reconnected_at_most_the_bound_an_hour(rig: Rig) -> None:
    for _ in range(10):
        rig.gateway.reading = GatewayReading(silent_for=6.0, heartbeat_interval=1.0)
        await rig.healer.check_gateway()
        rig.clock.advance(6)
    assert rig.gateway.reconnects == 3
    assert rig.outcomes(GATEWAY) == [DONE, DONE, DONE, HELD]


async def test_an_operator_holding_a_discord_breaker_open_keeps_the_healer_off_the_gateway(rig: Rig) -> None:
    rig.board.add("discord.send").force_open(reason="operator")
    rig.gateway.reading = GatewayReading(silent_for=30.0, heartbeat_interval=1.0)
    await rig.healer.check_gateway()
    assert rig.gateway.reconnects == 0


# --- memory ----------------------------------------------------------------------------------------


async def test_memory_above_the_threshold_trims_the_caches_and_collects(rig: Rig) -> None:
    await rig.healer.heal(rig.facts(rss=99 * MIB))
    assert not rig.collected and not rig.trimmed
    await rig.healer.heal(rig.facts(rss=150 * MIB))
    assert rig.trimmed == ["traces", "messages"] and rig.collected == [1]
    [record] = rig.healer.history()
    assert (record.kind, record.outcome) == (MEMORY, DONE)
    assert record.reason == "resident memory 150 MiB above 100 MiB"
    assert record.detail == "trimmed traces 7, messages 3; gc collected 42; resident 90 -> 90 MiB"


async def test_memory_that_stays_high_is_worked_on_at_most_the_bound_an_hour(rig: Rig) -> None:
    for _ in range(10):
        await rig.healer.heal(rig.facts(rss=150 * MIB))
        rig.clock.advance(30)
    assert len(rig.collected) == 3
    assert rig.outcomes(MEMORY) == [DONE, DONE, DONE, HELD]


# --- the loop, the view ------------------------------------------------------------------------------


async def test_an_assessment_wakes_the_healers_loop_which_acts_on_it_once(rig: Rig) -> None:
    rig.services["storage"].alive = False
    await rig.healer.observe(rig.facts())
    await rig.healer.run_once()
    await rig.healer.run_once()  # the same assessment is not acted on twice
    assert rig.services["storage"].starts == 2 and len(rig.healer.history()) == 1


async def test_the_healer_is_a_registry_service_whose_loop_acts_on_the_assessment_it_is_woken_for(
    tmp_path: Path,
) -> None:
    """Registered last, started by ``start_all``; its loop sleeps for real on a ``SteppedClock``
    (virtual time moves only when the test says) and ``observe`` wakes it at once."""
    rig = await make_rig(tmp_path, SteppedClock(), with_healer_service=True)
    try:
        assert rig.registry.order[-1] == "healer" and rig.healer.task.running
        rig.services["storage"].alive = False
        await rig.healer.observe(rig.facts())
        async with asyncio.timeout(10):
            while not rig.healer.history():
                await asyncio.sleep(0.01)
        assert rig.healer.history()[0].outcome == DONE and rig.services["storage"].starts == 2
        assert rig.registry.states()["healer"] is ServiceState.RUNNING  # never restarted itself
    finally:
        await rig.registry.stop_all()
    assert not rig.healer.task.running


async def test_a_disabled_healer_does_nothing(rig: Rig) -> None:
    rig.healer.enabled = False
    rig.services["storage"].alive = False
    await rig.healer.observe(rig.facts(rss=500 * MIB))
    await rig.healer.run_once()
    await rig.healer.heal(rig.facts(rss=500 * MIB))
    assert rig.healer.history() == [] and rig.services["storage"].starts == 1


async def test_the_report_and_the_admin_text_show_budgets_and_history_newest_first(rig: Rig) -> None:
    rig.services["storage"].alive = False
    await rig.healer.heal(rig.facts())
    rig.clock.advance(10)
    await rig.healer.heal(rig.facts(rss=150 * MIB))
    report = rig.healer.report()
    assert [row["kind"] for row in report["history"]] == [MEMORY, RESTART]
    assert report["kinds"][RESTART] == {"used": 1, "free_in": 0.0, "held": False}
    text = format_healing(report, rig.clock.time())
    assert "at most 3 actions of each kind an hour" in text
    assert "restart 1/3" in text and "memory 1/3" in text
    assert "restart `storage`: done" in text
    assert json.loads(json.dumps(report)) == report  # the HTTP API sends it as is
    off = format_healing(replace_report(report, enabled=False), rig.clock.time())
    assert off.startswith("Self-healing is off")


def replace_report(report: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**report, **changes}


async def test_without_a_discord_client_attached_the_healers_loop_stays_idle(tmp_path: Path) -> None:
    """A bare application (no client: no gateway, no assessment) never runs the loop, so a test of
    the services on a ``FakeClock`` does not see virtual time pushed on by it."""
    clock = FakeClock()
    healer = Healer(
        clock=clock, metrics=Metrics(process_metrics=False), board=BreakerBoard(clock),
        degradation=DegradationState(clock), datastore=DataStoreService(DataStore(tmp_path, clock=clock)),
        caches={},
    )
    await healer.start()
    assert not healer.task.running and clock.monotonic() == 1000.0
    await healer.stop()
