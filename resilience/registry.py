"""The service registry: an ordered list of services started and stopped with rollback.

Like discord.py's ``Cog._inject``: a partial start-up is undone in reverse before one error
naming the failed service is raised. Deliberately flat: no hierarchy. ``restart(name)`` stops
one service (and those that depend on it) and starts them again with the same rollback; it never
runs by itself: the healer (``bot.healing``) or an operator calls it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, Protocol

import structlog

from resilience.errors import CallTimeoutError, RegistryConfigError, ServiceStartError

log = structlog.get_logger(__name__)


class Service(Protocol):
    """What every dependency of the bot implements to be started and stopped in order.

    ``health()`` returns at least ``{"ok": bool}``. A service may also carry optional float
    attributes ``start_timeout`` / ``stop_timeout`` to override the registry's defaults.
    """

    name: str
    depends_on: tuple[str, ...]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


class ServiceState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


StateListener = Callable[[str, ServiceState, ServiceState], None]
"""Called as ``listener(service_name, old_state, new_state)`` on every change."""


def _start_order(services: list[Service]) -> list[Service]:
    """Topological order, stable: among ready services the one listed first goes first."""
    by_name: dict[str, Service] = {}
    duplicates: set[str] = set()
    for svc in services:
        if svc.name in by_name:
            duplicates.add(svc.name)
        by_name[svc.name] = svc
    if duplicates:
        raise RegistryConfigError(f"duplicate service name(s): {', '.join(sorted(duplicates))}")
    unknown = [
        f"{s.name!r} depends on unknown {dep!r}"
        for s in services
        for dep in s.depends_on
        if dep not in by_name
    ]
    if unknown:
        raise RegistryConfigError("unknown dependency: " + "; ".join(unknown))
    ordered: list[Service] = []
    placed: set[str] = set()
    remaining = list(services)
    while remaining:
        ready = next((s for s in remaining if all(d in placed for d in s.depends_on)), None)
        if ready is None:
            raise RegistryConfigError(f"dependency cycle: {_find_cycle(remaining)}")
        remaining.remove(ready)
        ordered.append(ready)
        placed.add(ready.name)
    return ordered


def _find_cycle(services: list[Service]) -> str:
    """Name one cycle among services none of which can start (each waits on another)."""
    deps = {s.name: [d for d in s.depends_on if d in {t.name for t in services}] for s in services}
    path: list[str] = []
    node = services[0].name
    while node not in path:
        path.append(node)
        node = deps[node][0]
    cycle = [*path[path.index(node):], node]
    return " -> ".join(cycle)


class ServiceRegistry:
    """Starts services in dependency order and stops them in reverse.

    ``start_all()`` runs each ``start()`` under its timeout; on the first failure it stops the
    services already started (reverse order, each stop under its timeout, failures logged)
    and raises ``ServiceStartError(name, cause)``. ``stop_all()`` never raises and is safe to
    call twice or after a failed start. The graph is validated at construction
    (``RegistryConfigError`` for a cycle, an unknown dependency or a duplicate name).
    """

    def __init__(
        self, services: Iterable[Service], *, start_timeout: float = 30.0, stop_timeout: float = 10.0
    ) -> None:
        self._order = _start_order(list(services))
        self._by_name = {s.name: s for s in self._order}
        self._states = {s.name: ServiceState.CREATED for s in self._order}
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._listeners: list[StateListener] = []

    @property
    def order(self) -> list[str]:
        """Service names in start order."""
        return [s.name for s in self._order]

    def get(self, name: str) -> Service:
        """The service called ``name`` (``KeyError`` if none)."""
        return self._by_name[name]

    def states(self) -> dict[str, ServiceState]:
        """Each service's state, in start order."""
        return dict(self._states)

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(name, old, new)`` on every state change."""
        self._listeners.append(listener)

    def health(self) -> dict[str, Any]:
        """``{"ok": all running and healthy, "services": {name: {"state": ..., **health}}}``."""
        services: dict[str, dict[str, Any]] = {}
        for svc in self._order:
            try:
                detail = dict(svc.health())
            except Exception as exc:
                detail = {"ok": False, "error": repr(exc)}
            detail["state"] = str(self._states[svc.name])
            detail.setdefault("ok", False)
            services[svc.name] = detail
        ok = all(d["ok"] and d["state"] == ServiceState.RUNNING for d in services.values())
        return {"ok": ok, "services": services}

    async def start_all(self) -> None:
        """Start every service not yet running, in order; roll back and raise on failure."""
        started: list[Service] = []
        for svc in self._order:
            if self._states[svc.name] is ServiceState.RUNNING:
                continue
            await self._start_one(svc, started)
            started.append(svc)

    async def _start_one(self, svc: Service, started: list[Service]) -> None:
        """Start ``svc`` under its timeout; on failure stop ``started`` (reverse) and raise."""
        timeout = float(getattr(svc, "start_timeout", None) or self._start_timeout)
        self._set(svc.name, ServiceState.STARTING)
        try:
            async with asyncio.timeout(timeout):
                await svc.start()
        except asyncio.CancelledError:
            self._set(svc.name, ServiceState.FAILED)
            await self._rollback(started)
            raise
        except Exception as exc:
            cause: BaseException = exc
            if isinstance(exc, TimeoutError) and not isinstance(exc, CallTimeoutError):
                cause = CallTimeoutError(f"start {svc.name}", timeout)
                cause.__cause__ = exc
            self._set(svc.name, ServiceState.FAILED)
            # The error names the cause; the stack is for debugging (a start-up failure is
            # reported to the person starting the bot as one sentence, not a traceback).
            log.error("service_start_failed", service=svc.name, error=repr(cause))
            log.debug("service_start_failed.stack", service=svc.name, exc_info=exc)
            await self._rollback(started)
            raise ServiceStartError(svc.name, cause) from cause
        self._set(svc.name, ServiceState.RUNNING)
        log.info("service_started", service=svc.name)

    def dependents(self, name: str) -> list[str]:
        """Services that depend on ``name``, directly or not, in start order (``KeyError`` if unknown)."""
        self._by_name[name]
        affected = {name}
        found: list[str] = []
        for svc in self._order:
            if svc.name != name and any(dep in affected for dep in svc.depends_on):
                affected.add(svc.name)
                found.append(svc.name)
        return found

    async def restart(self, name: str) -> list[str]:
        """Stop ``name`` and its started dependents (reverse order), then start them again in order.

        Returns the names restarted, in start order. A stop that fails or times out is logged and
        the start is tried anyway (the service's resources may be gone already). A start that
        fails is rolled back: that service's ``stop()`` releases what it half-opened, it stays
        ``FAILED``, the dependents after it are left ``STOPPED`` (they would fail without it), and
        ``ServiceStartError`` names it. Services restarted before it keep running.
        """
        group = [
            self._by_name[n]
            for n in (name, *self.dependents(name))
            if n == name or self._states[n] is not ServiceState.CREATED
        ]
        log.warning("service_restart", service=name, services=[s.name for s in group])
        live = (ServiceState.RUNNING, ServiceState.FAILED)
        await self._stop_each([s for s in reversed(group) if self._states[s.name] in live])
        for svc in group:
            try:
                await self._start_one(svc, [])
            except ServiceStartError:
                await self._undo_start(svc)
                raise
        return [s.name for s in group]

    async def _undo_start(self, svc: Service) -> None:
        """Release what a failed start opened; the state stays ``FAILED`` whatever ``stop()`` does."""
        timeout = float(getattr(svc, "stop_timeout", None) or self._stop_timeout)
        try:
            async with asyncio.timeout(timeout):
                await svc.stop()
        except Exception as exc:
            log.error("service_rollback_failed", service=svc.name, error=repr(exc))

    async def stop_all(self) -> None:
        """Stop every running service in reverse order; logs failures, never raises them."""
        running = [s for s in reversed(self._order) if self._states[s.name] is ServiceState.RUNNING]
        await self._stop_each(running)

    async def _rollback(self, started: list[Service]) -> None:
        if started:
            log.warning("service_start_rollback", services=[s.name for s in reversed(started)])
        await self._stop_each(list(reversed(started)))

    async def _stop_each(self, services: list[Service]) -> None:
        for svc in services:
            timeout = float(getattr(svc, "stop_timeout", None) or self._stop_timeout)
            self._set(svc.name, ServiceState.STOPPING)
            try:
                async with asyncio.timeout(timeout):
                    await svc.stop()
            except TimeoutError:
                self._set(svc.name, ServiceState.FAILED)
                log.error("service_stop_timeout", service=svc.name, timeout=timeout)
                continue
            except Exception as exc:
                self._set(svc.name, ServiceState.FAILED)
                log.error("service_stop_failed", service=svc.name, error=repr(exc), exc_info=exc)
                continue
            self._set(svc.name, ServiceState.STOPPED)
            log.info("service_stopped", service=svc.name)

    def _set(self, name: str, state: ServiceState) -> None:
        old = self._states[name]
        if old is state:
            return
        self._states[name] = state
        for listener in self._listeners:
            try:
                listener(name, old, state)
            except Exception as exc:
                log.error("registry_listener_failed", service=name, error=repr(exc), exc_info=exc)
