"""ServiceRegistry: dependency order, graph validation, start rollback, idempotent stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilience.errors import CallTimeoutError, RegistryConfigError, ServiceStartError
from resilience.registry import ServiceRegistry, ServiceState


class Recorder:
    """A service that records start/stop into a shared log and can be told to fail or hang."""

    def __init__(
        self,
        name: str,
        log: list[str],
        depends_on: tuple[str, ...] = (),
        *,
        start_error: Exception | None = None,
        stop_error: Exception | None = None,
        hang_start: bool = False,
        hang_stop: bool = False,
    ) -> None:
        self.name = name
        self.depends_on = depends_on
        self.log = log
        self.start_error = start_error
        self.stop_error = stop_error
        self.hang_start = hang_start
        self.hang_stop = hang_stop
        self.ok = True

    async def start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.hang_start:
            await asyncio.Event().wait()
        if self.start_error is not None:
            raise self.start_error

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.hang_stop:
            await asyncio.Event().wait()
        if self.stop_error is not None:
            raise self.stop_error

    def health(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.name}


async def test_starts_in_dependency_order_and_stops_in_reverse() -> None:
    """Dependencies start first (stable among equals); stop_all runs in exact reverse."""
    log: list[str] = []
    services = [
        Recorder("gemini", log, ("config", "metrics")),
        Recorder("config", log),
        Recorder("metrics", log, ("config",)),
        Recorder("storage", log, ("config",)),
    ]
    registry = ServiceRegistry(services)
    assert registry.order == ["config", "metrics", "gemini", "storage"]
    await registry.start_all()
    assert log == ["start config", "start metrics", "start gemini", "start storage"]
    assert set(registry.states().values()) == {ServiceState.RUNNING}
    log.clear()
    await registry.stop_all()
    assert log == ["stop storage", "stop gemini", "stop metrics", "stop config"]
    assert set(registry.states().values()) == {ServiceState.STOPPED}


def test_cycle_is_rejected_before_anything_starts() -> None:
    """A dependency cycle raises RegistryConfigError naming the cycle (arrows read "depends on")."""
    log: list[str] = []
    services = [Recorder("x", log), Recorder("a", log, ("c",)), Recorder("b", log, ("a",))]
    services.append(Recorder("c", log, ("b",)))
    with pytest.raises(RegistryConfigError, match="dependency cycle: a -> c -> b -> a"):
        ServiceRegistry(services)
    assert log == []


def test_self_dependency_is_a_cycle() -> None:
    """A service depending on itself is a cycle."""
    with pytest.raises(RegistryConfigError, match="a -> a"):
        ServiceRegistry([Recorder("a", [], ("a",))])


def test_unknown_dependency_is_rejected_with_names() -> None:
    """An unknown dependency names both the service and the missing dependency."""
    with pytest.raises(RegistryConfigError, match="'gemini' depends on unknown 'confg'"):
        ServiceRegistry([Recorder("config", []), Recorder("gemini", [], ("confg",))])


def test_duplicate_name_is_rejected() -> None:
    """Two services with one name are a configuration error."""
    with pytest.raises(RegistryConfigError, match=r"duplicate service name.*config"):
        ServiceRegistry([Recorder("config", []), Recorder("config", [])])


async def test_start_failure_rolls_back_in_reverse_and_names_the_service() -> None:
    """A raising start stops the started services in reverse; the error names it and chains the cause."""
    log: list[str] = []
    boom = RuntimeError("disk on fire")
    registry = ServiceRegistry(
        [
            Recorder("a", log),
            Recorder("b", log, ("a",)),
            Recorder("c", log, ("b",), start_error=boom),
            Recorder("d", log, ("c",)),
        ]
    )
    with pytest.raises(ServiceStartError) as info:
        await registry.start_all()
    assert info.value.service == "c"
    assert info.value.cause is boom
    assert info.value.__cause__ is boom
    assert "'c'" in str(info.value)
    assert log == ["start a", "start b", "start c", "stop b", "stop a"]
    assert registry.states() == {
        "a": ServiceState.STOPPED,
        "b": ServiceState.STOPPED,
        "c": ServiceState.FAILED,
        "d": ServiceState.CREATED,
    }


async def test_start_timeout_triggers_rollback_with_timeout_cause() -> None:
    """A hanging start is cut at its per-service timeout and rolled back; the cause is a CallTimeoutError."""
    log: list[str] = []
    slow = Recorder("slow", log, ("a",), hang_start=True)
    slow.start_timeout = 0.02  # type: ignore[attr-defined]
    registry = ServiceRegistry([Recorder("a", log), slow], start_timeout=30.0)
    async with asyncio.timeout(2):
        with pytest.raises(ServiceStartError) as info:
            await registry.start_all()
    assert info.value.service == "slow"
    assert isinstance(info.value.cause, CallTimeoutError)
    assert info.value.cause.timeout == 0.02
    assert log == ["start a", "start slow", "stop a"]


async def test_rollback_continues_past_a_hanging_and_a_raising_stop() -> None:
    """In rollback a hanging stop is cut at its timeout, a raising stop is logged; the rest still stop."""
    log: list[str] = []
    registry = ServiceRegistry(
        [
            Recorder("a", log),
            Recorder("b", log, ("a",), stop_error=RuntimeError("stop broke")),
            Recorder("c", log, ("b",), hang_stop=True),
            Recorder("d", log, ("c",), start_error=ValueError("bad config")),
        ],
        stop_timeout=0.02,
    )
    async with asyncio.timeout(2):
        with pytest.raises(ServiceStartError, match="'d'"):
            await registry.start_all()
    assert log == ["start a", "start b", "start c", "start d", "stop c", "stop b", "stop a"]
    states = registry.states()
    assert states["a"] is ServiceState.STOPPED
    assert states["b"] is ServiceState.FAILED
    assert states["c"] is ServiceState.FAILED


async def test_stop_all_is_idempotent_and_safe_after_failed_start() -> None:
    """stop_all after a failed start stops nothing twice; a second stop_all does nothing; it never raises."""
    log: list[str] = []
    registry = ServiceRegistry([Recorder("a", log), Recorder("b", log, ("a",), start_error=OSError("nope"))])
    with pytest.raises(ServiceStartError):
        await registry.start_all()
    log.clear()
    await registry.stop_all()
    await registry.stop_all()
    assert log == []

    ok_log: list[str] = []
    ok = ServiceRegistry([Recorder("a", ok_log, stop_error=RuntimeError("x")), Recorder("b", ok_log)])
    await ok.start_all()
    await ok.stop_all()
    await ok.stop_all()
    assert ok_log == ["start a", "start b", "stop b", "stop a"]


async def test_health_merges_service_health_and_states_and_listeners_see_changes() -> None:
    """health() reports each service's own health plus its state; listeners get (name, old, new)."""
    log: list[str] = []
    a, b = Recorder("a", log), Recorder("b", log)
    registry = ServiceRegistry([a, b])
    changes: list[tuple[str, str, str]] = []
    registry.add_listener(lambda name, old, new: changes.append((name, str(old), str(new))))
    assert registry.health()["ok"] is False
    await registry.start_all()
    health = registry.health()
    assert health["ok"] is True
    assert health["services"]["a"] == {"ok": True, "detail": "a", "state": "running"}
    b.ok = False
    assert registry.health()["ok"] is False
    assert registry.get("b") is b
    assert changes[:4] == [
        ("a", "created", "starting"),
        ("a", "starting", "running"),
        ("b", "created", "starting"),
        ("b", "starting", "running"),
    ]


async def test_start_all_skips_services_already_running() -> None:
    """Calling start_all twice does not start a running service again."""
    log: list[str] = []
    registry = ServiceRegistry([Recorder("a", log)])
    await registry.start_all()
    await registry.start_all()
    assert log == ["start a"]


async def test_cancelling_start_all_rolls_back_and_propagates_cancellation() -> None:
    """A start_all cancelled mid-start stops what it started and re-raises CancelledError."""
    log: list[str] = []
    registry = ServiceRegistry([Recorder("a", log), Recorder("b", log, ("a",), hang_start=True)])
    task = asyncio.create_task(registry.start_all())
    async with asyncio.timeout(2):
        while log != ["start a", "start b"]:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert log == ["start a", "start b", "stop a"]
    assert registry.states() == {"a": ServiceState.STOPPED, "b": ServiceState.FAILED}


# --- restart (the healer's: bot/healing.py) ---------------------------------------------------------


async def test_restart_stops_a_service_and_its_dependents_in_reverse_and_starts_them_in_order() -> None:
    log: list[str] = []
    services = [
        Recorder("config", log),
        Recorder("storage", log, ("config",)),
        Recorder("usage", log, ("storage",)),
        Recorder("http", log, ("config",)),
        Recorder("report", log, ("usage",)),
    ]
    registry = ServiceRegistry(services)
    await registry.start_all()
    assert registry.dependents("storage") == ["usage", "report"]
    log.clear()
    assert await registry.restart("storage") == ["storage", "usage", "report"]
    assert log == [
        "stop report", "stop usage", "stop storage", "start storage", "start usage", "start report"
    ]
    assert set(registry.states().values()) == {ServiceState.RUNNING}


async def test_restart_of_a_failed_start_rolls_it_back_and_leaves_its_dependents_stopped() -> None:
    """The failed service's stop() releases what it half-opened; it stays FAILED; the error names it;
    its dependents are not started on top of it; a later restart brings all of them back."""
    log: list[str] = []
    storage = Recorder("storage", log)
    services = [storage, Recorder("usage", log, ("storage",))]
    registry = ServiceRegistry(services)
    await registry.start_all()
    log.clear()
    storage.start_error = ConnectionError("disk gone")
    with pytest.raises(ServiceStartError) as info:
        await registry.restart("storage")
    assert info.value.service == "storage"
    assert log == ["stop usage", "stop storage", "start storage", "stop storage"]
    assert registry.states() == {"storage": ServiceState.FAILED, "usage": ServiceState.STOPPED}
    storage.start_error = None
    log.clear()
    await registry.restart("storage")
    assert log == ["stop storage", "start storage", "start usage"]
    assert set(registry.states().values()) == {ServiceState.RUNNING}


async def test_restart_goes_on_when_the_stop_fails_and_never_starts_a_service_that_never_ran() -> None:
    log: list[str] = []
    storage = Recorder("storage", log, stop_error=OSError("already closed"))
    registry = ServiceRegistry([storage, Recorder("late", log, ("storage",))])
    await registry._start_one(storage, [])  # only storage started; "late" was never started
    log.clear()
    assert await registry.restart("storage") == ["storage"]
    assert log == ["stop storage", "start storage"]
    assert registry.states() == {"storage": ServiceState.RUNNING, "late": ServiceState.CREATED}
