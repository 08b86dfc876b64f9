"""Self-healing: a registry service that watches the health assessment and repairs what it can.

The ``Healer`` hears every health assessment (``bot.health``: it is one of its consumers) and runs a
short loop of its own for the gateway. It looks for four faults and acts on each:

- ``restart``: a service the registry holds ``FAILED`` (its start or stop failed), or one that runs
  but whose ``health()`` says ``"alive": False`` (its own machinery is gone, e.g. the HTTP API's
  listening socket): ``ServiceRegistry.restart`` stops it and what depends on it and starts them
  again, rolling a failed start back.
- ``datastore``: a DataStore file damaged on disk (``validate``): recovered the way an operator's
  ``/admin datastore recover`` does (the file, its ``.bak``, the state last committed, the newest
  valid timestamped backup), then applied to the running bot.
- ``gateway``: no frame from Discord's gateway, not even a heartbeat ACK, for
  ``HEAL_GATEWAY_SILENCE_SECONDS`` (never sooner than one heartbeat interval plus ``ACK_GRACE``: a
  quiet but healthy connection hears only an ACK per interval). The socket is closed with 4000 and
  discord.py reconnects and RESUMEs, events replayed, before its own 60 s timeout would.
- ``memory``: resident memory above ``HEAL_MEMORY_MB``: the caches that can be rebuilt on demand are
  trimmed (``BoundedCache.trim``), then a full ``gc.collect()``.

Bounds: each kind acts at most ``max_per_hour`` times in any hour (a sliding window on the injected
clock); past that the fault is recorded once as ``held`` and left to the alerts and the operator,
so a fault the healer cannot fix never makes it loop. The healer never fights an operator: it does
nothing while bot-wide maintenance is on, and it leaves a service (or the gateway) alone while an
operator holds one of its breakers open (``/admin circuit open``).

Every action is logged (``healing.action``), counted (``bot_healing_actions_total{kind,outcome}``)
and kept in a bounded history (the last ``HISTORY`` actions, in memory: a restarted bot starts a
new one; the log keeps them all), shown by ``/admin healing`` and ``GET /api/health/healing``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from resilience.breakers import BreakerSnapshot, BreakerState
from resilience.degradation import DegradationState, Mode
from resilience.registry import ServiceRegistry, ServiceState
from resilience.tasks import SupervisedTask
from services.http_api import rss_bytes

if TYPE_CHECKING:
    from resilience.breakers import BreakerBoard
    from resilience.clock import Clock
    from services.datastore import SharedStateService
    from services.metrics import Metrics


class Facts(Protocol):
    """What the healer reads of one health assessment (``bot.health.Facts``; a protocol, so the
    healer, which the application builds, does not import the assessment, which imports it)."""

    @property
    def breakers(self) -> tuple[BreakerSnapshot, ...]: ...

    @property
    def rss_bytes(self) -> int | None: ...

log = structlog.get_logger("bot.healing")

RESTART = "restart"
DATASTORE = "datastore"
GATEWAY = "gateway"
MEMORY = "memory"
KINDS = (RESTART, DATASTORE, GATEWAY, MEMORY)

DONE = "done"
FAILED = "failed"
HELD = "held"

HISTORY = 100  # actions kept for /admin healing and the HTTP view
WINDOW = 3600.0  # the rate bound's window: max_per_hour actions per kind in any hour
ACK_GRACE = 3.0  # seconds past a heartbeat interval a healthy gateway's ACK may take
HEARTBEAT_TIMEOUT = 60.0  # discord.py's own limit (ConnectionState.heartbeat_timeout): it acts then
ACTION_TIMEOUT = 60.0  # one action at most: a restart's stop (10 s) and start (30 s) fit in it
MIB = 1024 * 1024
# The breakers an operator holds open to keep the healer off a service: by name prefix.
SERVICE_BREAKERS: dict[str, tuple[str, ...]] = {
    "gemini": ("gemini",),
    "discord_io": ("discord.",),
    "storage": ("storage",),
    "datastore": ("storage",),
}
GATEWAY_BREAKERS = ("discord.",)


@dataclass(frozen=True, slots=True)
class GatewayReading:
    """What the gateway connection says now: seconds since its last frame, its heartbeat interval."""

    silent_for: float
    heartbeat_interval: float | None


GatewayProbe = Callable[[], GatewayReading | None]
"""The live session's reading, or None when there is none to judge (not connected, reconnecting)."""
Reconnect = Callable[[], Awaitable[object]]
RecoverFile = Callable[[str], Awaitable[str]]
"""Recovers DataStore file ``name`` and applies it; returns the source that served it."""


@dataclass(frozen=True, slots=True)
class HealingRecord:
    """One action: when (wall time), what, why, how it ended and what it did."""

    at: float
    kind: str
    target: str
    reason: str
    outcome: str
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind,
            "target": self.target,
            "reason": self.reason,
            "outcome": self.outcome,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


class ActionBudget:
    """At most ``limit`` actions per kind in any ``window`` seconds (sliding), on ``clock``."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit >= 1 and window > 0 are required")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._spent: dict[str, deque[float]] = {}

    def allows(self, kind: str) -> bool:
        return len(self._recent(kind)) < self.limit

    def spend(self, kind: str) -> None:
        self._recent(kind).append(self._clock.monotonic())

    def free_in(self, kind: str) -> float:
        """Seconds until ``kind`` may act again (0 when it may now)."""
        spent = self._recent(kind)
        if len(spent) < self.limit:
            return 0.0
        return max(0.0, spent[0] + self.window - self._clock.monotonic())

    def used(self, kind: str) -> int:
        return len(self._recent(kind))

    def _recent(self, kind: str) -> deque[float]:
        spent = self._spent.setdefault(kind, deque(maxlen=self.limit))
        horizon = self._clock.monotonic() - self.window
        while spent and spent[0] <= horizon:
            spent.popleft()
        return spent


class Healer:
    """The self-healing service (registry name ``healer``); see the module docstring.

    ``registry`` is set once the registry exists (it holds the healer). ``caches`` is the memory
    view's map (``HealthSources.caches``): the entries with a ``trim`` are trimmed. ``attach`` gives
    what only the Discord client has: the gateway probe, the reconnect, and the DataStore recovery
    that also applies the file to the running bot (the operator's). ``collect`` and ``rss`` are
    ``gc.collect`` and the resident memory reading, injectable for tests.
    """

    name = "healer"
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        clock: Clock,
        metrics: Metrics,
        board: BreakerBoard,
        degradation: DegradationState,
        datastore: SharedStateService,
        caches: Mapping[str, Callable[[], int]],
        enabled: bool = True,
        max_per_hour: int = 3,
        gateway_silence: float = 45.0,
        memory_bytes: int = 768 * MIB,
        window: float = WINDOW,
        check_interval: float | None = None,
        collect: Callable[[], int] = gc.collect,
        rss: Callable[[], int | None] | None = None,
    ) -> None:
        self.registry: ServiceRegistry | None = None
        self.enabled = enabled
        self.gateway_silence = gateway_silence
        self.memory_bytes = memory_bytes
        self._clock = clock
        self._metrics = metrics
        self._board = board
        self._degradation = degradation
        self._datastore = datastore
        self._caches = caches
        self._collect = collect
        self._rss = rss if rss is not None else rss_bytes
        self._budget = ActionBudget(max_per_hour, window, clock)
        self._history: deque[HealingRecord] = deque(maxlen=HISTORY)
        self._held: set[str] = set()  # kinds whose hold is recorded: once per episode
        self._gateway: GatewayProbe | None = None
        self._reconnect: Reconnect | None = None
        self._recover_file: RecoverFile = self._recover_only
        self._facts: Facts | None = None  # the latest assessment not yet acted on
        interval = check_interval if check_interval is not None else min(5.0, max(0.5, gateway_silence / 5))
        self.task = SupervisedTask(
            "healer",
            self.run_once,
            interval=interval,
            # One run may take an action of each kind, each within ACTION_TIMEOUT.
            run_timeout=len(KINDS) * ACTION_TIMEOUT + 1.0,
            max_consecutive_failures=1_000_000,  # the watch must never give up for good
            clock=clock,
        )

    def attach(
        self,
        *,
        gateway: GatewayProbe | None = None,
        reconnect: Reconnect | None = None,
        recover_file: RecoverFile | None = None,
    ) -> None:
        """Give the healer what the Discord client provides (each optional)."""
        if gateway is not None:
            self._gateway = gateway
        if reconnect is not None:
            self._reconnect = reconnect
        if recover_file is not None:
            self._recover_file = recover_file

    # -- service protocol -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the loop, once the Discord client attached itself: the client owns the gateway it
        watches and the health assessment it acts on. A bare application (a tool, a test of the
        services) has neither, and its healer stays idle."""
        if self.enabled and self._gateway is not None:
            self.task.start()

    async def stop(self) -> None:
        await self.task.stop()

    def health(self) -> dict[str, Any]:
        return {
            "ok": True, "enabled": self.enabled, "actions": len(self._history), "held": sorted(self._held)
        }

    # -- what it shows --------------------------------------------------------------------------

    def history(self) -> list[HealingRecord]:
        """The kept actions, newest first."""
        return list(reversed(self._history))

    def report(self) -> dict[str, Any]:
        """The settings, each kind's use of its budget, and the history (newest first)."""
        return {
            "enabled": self.enabled,
            "max_per_hour": self._budget.limit,
            "gateway_silence_seconds": self.gateway_silence,
            "memory_threshold_bytes": self.memory_bytes,
            "kinds": {
                kind: {
                    "used": self._budget.used(kind),
                    "free_in": round(self._budget.free_in(kind), 1),
                    "held": kind in self._held,
                }
                for kind in KINDS
            },
            "history": [record.as_dict() for record in self.history()],
        }

    # -- after each health assessment -------------------------------------------------------------

    async def observe(self, facts: Facts) -> None:
        """A health assessment's consumer: hand its facts to the healer's loop and wake it.

        The actions run in the healer's own task, under its own timeouts: a restart never holds
        up the assessment (nor is it cut short by the assessment's time box).
        """
        if self.enabled:
            self._facts = facts
            self.task.wake()

    async def run_once(self) -> None:
        """One run of the healer's loop: the gateway watch, then the latest assessment's faults."""
        await self.check_gateway()
        facts, self._facts = self._facts, None
        if facts is not None:
            await self.heal(facts)

    async def heal(self, facts: Facts) -> None:
        """Act on one assessment: restart failed services, recover damaged files, free memory."""
        if not self.enabled or self._operator_in_charge():
            return
        forced = _forced(facts.breakers)
        await self._heal_services(forced)
        if not _held_open(("storage",), forced):
            await self._heal_datastore()
        rss = facts.rss_bytes
        if rss is not None and rss > self.memory_bytes:
            reason = f"resident memory {rss / MIB:.0f} MiB above {self.memory_bytes / MIB:.0f} MiB"
            await self._act(MEMORY, "process", reason, self._free_memory)

    async def _heal_services(self, forced: set[str]) -> None:
        registry = self.registry
        if registry is None:
            return
        for name, state in registry.states().items():
            if name == self.name:
                continue
            reason = _service_problem(registry, name, state)
            if reason is None:
                continue
            if _held_open(SERVICE_BREAKERS.get(name, ()), forced):
                log.info("healing.left_to_operator", kind=RESTART, target=name, reason=reason)
                continue
            await self._act(RESTART, name, reason, functools.partial(self._restart, registry, name))

    async def _restart(self, registry: ServiceRegistry, name: str) -> str:
        restarted = await registry.restart(name)
        return f"restarted {', '.join(restarted)}"

    async def _heal_datastore(self) -> None:
        try:
            reports = await self._datastore.validate()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # storage down: the assessment reports it; nothing to recover from now
            log.info("healing.datastore_unreadable", error=type(exc).__name__)
            return
        for report in reports:
            if report.ok:
                continue
            reason = "damaged on disk: " + "; ".join(report.problems)[:200]
            await self._act(DATASTORE, report.name, reason, functools.partial(self._recover, report.name))

    async def _recover(self, name: str) -> str:
        source = await self._recover_file(name)
        if source == "defaults":
            raise RecoveryExhaustedError(f"no valid copy of {name} was left: it serves the defaults")
        return f"recovered from {source}"

    async def _recover_only(self, name: str) -> str:
        return (await self._datastore.recover(name)).source

    async def _free_memory(self) -> str:
        before = self._rss()
        trimmed: dict[str, int] = {}
        for cache, size in list(self._caches.items()):
            trim = getattr(size, "trim", None)
            if trim is None:
                continue
            try:
                trimmed[cache] = int(trim())
            except Exception as exc:  # one cache that cannot trim does not stop the others
                log.warning("healing.trim_failed", cache=cache, error=type(exc).__name__)
        collected = self._collect()
        after = self._rss()
        dropped = ", ".join(f"{name} {n}" for name, n in trimmed.items() if n) or "nothing"
        return f"trimmed {dropped}; gc collected {collected}; resident {_mib(before)} -> {_mib(after)} MiB"

    # -- the gateway watch (its own loop: the assessment runs only every 30 s) -------------------

    async def check_gateway(self) -> None:
        """Reconnect a gateway connection that has been silent too long; one run of the healer's loop."""
        probe = self._gateway
        if not self.enabled or probe is None or self._reconnect is None or self._operator_in_charge():
            return
        reading = probe()
        if reading is None:
            return
        limit = max(self.gateway_silence, (reading.heartbeat_interval or 0.0) + ACK_GRACE)
        if limit >= HEARTBEAT_TIMEOUT or reading.silent_for < limit:
            return  # past 60 s discord.py reconnects by itself
        if _held_open(GATEWAY_BREAKERS, _forced(self._board.snapshot())):
            log.info("healing.left_to_operator", kind=GATEWAY, target="discord")
            return
        reason = f"no frame from the gateway for {reading.silent_for:.1f} s (limit {limit:.1f} s)"
        await self._act(GATEWAY, "discord", reason, self._reconnect_gateway)

    async def _reconnect_gateway(self) -> str:
        assert self._reconnect is not None
        await self._reconnect()
        return "closed the socket with 4000: discord.py reconnects and resumes"

    # -- acting, bounded and recorded -------------------------------------------------------------

    async def _act(self, kind: str, target: str, reason: str, work: Callable[[], Awaitable[str]]) -> None:
        if not self._budget.allows(kind):
            self._metrics.healing_actions.labels(kind, HELD).inc()
            if kind not in self._held:
                self._held.add(kind)
                free_in = self._budget.free_in(kind)
                detail = f"{self._budget.limit} {kind} actions in the last hour; next in {free_in:.0f} s"
                self._record(kind, target, reason, HELD, detail, 0.0)
            return
        self._held.discard(kind)
        self._budget.spend(kind)
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(ACTION_TIMEOUT):
                detail = await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome, detail = FAILED, _describe(exc)
        else:
            outcome = DONE
        self._metrics.healing_actions.labels(kind, outcome).inc()
        self._record(kind, target, reason, outcome, detail, self._clock.monotonic() - started)

    def _record(self, kind: str, target: str, reason: str, outcome: str, detail: str, seconds: float) -> None:
        record = HealingRecord(self._clock.time(), kind, target, reason, outcome, detail, seconds)
        self._history.append(record)
        emit = log.error if outcome == FAILED else log.warning
        emit("healing.action", kind=kind, target=target, reason=reason, outcome=outcome, detail=detail,
             seconds=round(seconds, 3))

    def _operator_in_charge(self) -> bool:
        """Bot-wide maintenance: an operator is at work, the healer keeps its hands off."""
        return self._degradation.mode is Mode.MAINTENANCE


class RecoveryExhaustedError(Exception):
    """A DataStore recovery found no valid copy: the file serves its defaults (and an alert stands)."""


def _service_problem(registry: ServiceRegistry, name: str, state: ServiceState) -> str | None:
    """Why service ``name`` needs a restart, or None."""
    if state is ServiceState.FAILED:
        return "the registry holds it failed"
    if state is not ServiceState.RUNNING:
        return None
    try:
        alive = registry.get(name).health().get("alive", True)
    except Exception:  # a health() that raises is the health views' concern, not proof of death
        return None
    return None if alive else "it runs but reports itself not alive"


def _forced(breakers: Iterable[BreakerSnapshot]) -> set[str]:
    """Breakers an operator holds open now."""
    return {b.name for b in breakers if b.forced_reason is not None and b.state is not BreakerState.CLOSED}


def _held_open(prefixes: Iterable[str], forced: set[str]) -> bool:
    return any(name.startswith(prefix) for prefix in prefixes for name in forced)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / MIB:.0f}"
