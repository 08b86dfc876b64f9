"""The periodic health assessment: degraded mode with its reason, the Discord presence, the figures
alerts and incidents work from.

``HealthMonitor`` is a supervised loop (``resilience.tasks.SupervisedTask``) that runs every
``HEALTH_INTERVAL_SECONDS``. Each run gathers the ``Facts`` (breakers not closed and since when,
the durable queue, storage failures, DataStore files serving defaults, disabled supervised tasks,
resident memory, recent error rate and dead letters, availability) and then:

- sets ``Mode.DEGRADED`` with a reason when something users feel is wrong (an open breaker, a
  queue older than ``DEGRADED_QUEUE_AGE_SECONDS``, settings reset to defaults, storage failing),
  and back to ``Mode.NORMAL`` by itself once it is not; maintenance, set by an operator, wins;
- shows the mode in the bot's Discord presence ("answers delayed: Gemini unavailable") through the
  ``presence`` callable the client gives, and clears it;
- hands the facts to its consumers (``bot.alerts.Alerter.evaluate``, ``bot.incidents``), each
  failure of which is logged and does not stop the others.

Nothing here sends to Discord's REST API: the presence goes over the gateway.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from bot import texts
from resilience.breakers import BreakerSnapshot, BreakerState
from resilience.degradation import DegradationSnapshot, Mode, QueueStats
from resilience.errors import classify
from resilience.tasks import SupervisedTask
from services.storage import AvailabilityDay

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.health")

ERROR_RATE_WINDOW = 300.0  # seconds behind the recent error rate
DEAD_LETTER_WINDOW = 3600.0  # seconds behind "dead letters in the last hour"
SAMPLE_EVERY = 10.0  # at most one counter sample per 10 s, so the history stays short at any interval
SAMPLES = int(DEAD_LETTER_WINDOW / SAMPLE_EVERY) + 2
RUN_TIMEOUT = 20.0  # one assessment, storage reads and alert delivery included
PRESENCE_TIMEOUT = 5.0
AVAILABILITY_DAYS = 7
# Breakers whose state users do not feel (the alert webhook's own): no degraded mode for them.
QUIET_BREAKER_PREFIX = "alerts."

# What users feel when a breaker is open, for the mode's reason and the presence.
BREAKER_EFFECTS = {
    "gemini": "Gemini unavailable",
    "discord.send": "Discord not taking messages",
    "discord.read": "Discord reads failing",
    "discord.edit": "Discord edits failing",
    "discord.react": "Discord reactions failing",
    "discord.typing": "Discord typing failing",
    "storage": "storage failing",
}

Presence = Callable[[str | None], Awaitable[None]]
"""Shows ``text`` as the bot's status in Discord (None clears it); raises when it cannot now."""
Consumer = Callable[["Facts"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Availability:
    """Accepted messages answered within 30 s against the objective, per UTC day (today last).

    ``ratio`` is None without a settled message; ``budget_left`` is the share of the error budget
    (``1 - slo`` of the settled messages) not yet spent: 1 untouched, 0 spent, below 0 overspent.
    """

    slo: float
    days: tuple[AvailabilityDay, ...]

    @staticmethod
    def ratio_of(day: AvailabilityDay | None) -> float | None:
        if day is None or not day.settled:
            return None
        return day.answered_in_time / day.settled

    def budget_left_of(self, day: AvailabilityDay | None) -> float:
        if day is None or not day.settled:
            return 1.0
        allowed = (1.0 - self.slo) * day.settled
        missed = day.settled - day.answered_in_time
        return 1.0 - missed / allowed

    @property
    def today(self) -> AvailabilityDay | None:
        return self.days[-1] if self.days else None

    def as_dict(self, today: int) -> dict[str, object]:
        current = self.days[-1] if self.days and self.days[-1].day == today else None
        return {
            "slo": self.slo,
            "today": {
                "ratio": _round(self.ratio_of(current)),
                "budget_left": round(self.budget_left_of(current), 4),
                "accepted": current.accepted if current else 0,
                "settled": current.settled if current else 0,
                "answered_in_time": current.answered_in_time if current else 0,
            },
            "days": [
                {
                    "day": day.day,
                    "accepted": day.accepted,
                    "settled": day.settled,
                    "answered": day.answered,
                    "answered_in_time": day.answered_in_time,
                    "ratio": _round(self.ratio_of(day)),
                    "budget_left": round(self.budget_left_of(day), 4),
                }
                for day in self.days
            ],
        }


@dataclass(frozen=True, slots=True)
class Facts:
    """What one assessment saw. ``at`` is wall-clock time, ``open_for`` seconds each breaker that is
    not closed has been so (since it left closed), ``problems`` the degraded-mode reasons."""

    at: float
    breakers: tuple[BreakerSnapshot, ...]
    open_for: dict[str, float]
    queue: QueueStats | None
    storage_problem: str | None
    datastore_defaults: tuple[str, ...]
    disabled_tasks: tuple[str, ...]
    rss_bytes: int | None
    recent_messages: float
    recent_errors: float
    dead_letters_last_hour: float
    mode: DegradationSnapshot
    availability: Availability | None
    problems: tuple[str, ...] = field(default=())


class HealthMonitor:
    """Assesses the bot every ``interval`` seconds; ``tasks`` lists the supervised tasks to watch
    (this one's included), ``presence`` shows the mode in Discord."""

    def __init__(
        self,
        app: Application,
        *,
        presence: Presence | None = None,
        tasks: Callable[[], Iterable[SupervisedTask]] = tuple,
        interval: float | None = None,
    ) -> None:
        self.app = app
        cfg = app.config
        self.interval = cfg.health_interval_seconds if interval is None else interval
        self._presence = presence
        self._tasks = tasks
        self._consumers: list[Consumer] = []
        self._open_since: dict[str, float] = {}
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=SAMPLES)
        self._shown: str | None = None  # the presence text last applied
        self._presence_due = False
        self.last: Facts | None = None
        self.task = SupervisedTask(
            "health",
            self.run_once,
            interval=self.interval,
            run_timeout=RUN_TIMEOUT,
            max_consecutive_failures=1_000_000,  # the assessment must never give up for good
            clock=app.clock,
        )
        app.board.add_listener(self._breaker_changed)
        for snap in app.board.snapshot():
            if snap.state is not BreakerState.CLOSED:
                self._open_since[snap.name] = app.clock.monotonic()
        app.metrics.availability_slo.set(cfg.availability_slo)

    def add_consumer(self, consumer: Consumer) -> None:
        """Call ``await consumer(facts)`` after each assessment (alerts, incidents)."""
        self._consumers.append(consumer)

    def start(self) -> None:
        self.task.start()

    async def stop(self) -> None:
        await self.task.stop()

    def presence_lost(self) -> None:
        """The gateway session is new (a fresh IDENTIFY): show the presence again at the next run."""
        self._presence_due = True

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.CLOSED:
            self._open_since.pop(name, None)
        elif old is BreakerState.CLOSED:
            self._open_since[name] = self.app.clock.monotonic()

    # -- one assessment ----------------------------------------------------------------------

    async def run_once(self) -> None:
        facts = await self.assess()
        self.last = facts
        self._apply_mode(facts)
        await self._show_presence()
        for consumer in list(self._consumers):
            try:
                await consumer(facts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("health.consumer_failed", consumer=_name(consumer), error=repr(exc),
                            category=classify(exc).category.value)

    async def assess(self) -> Facts:
        """Gather the facts; storage failures become a fact, never an exception."""
        app = self.app
        clock = app.clock
        now, mono = clock.time(), clock.monotonic()
        metrics = app.metrics
        storage_problem: str | None = None
        queue: QueueStats | None = None
        try:
            queue = await app.storage.stats(now=now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            storage_problem = f"storage unreadable ({classify(exc).category.value})"
        if queue is not None:
            metrics.set_queue_stats(queue)
        health = app.storage.health()
        failures = int(health.get("consecutive_failures") or 0)
        metrics.storage_consecutive_failures.set(failures)
        if storage_problem is None and failures:
            storage_problem = f"storage failing ({failures} operations in a row)"
        availability: Availability | None = None
        if storage_problem is None:
            try:
                days = await app.storage.availability(now=now, days=AVAILABILITY_DAYS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                storage_problem = f"storage unreadable ({classify(exc).category.value})"
            else:
                availability = Availability(app.config.availability_slo, tuple(days))
                self._publish_availability(availability, int(now // 86400))
        defaults = tuple(app.store.alerts())
        metrics.datastore_defaults_files.set(len(defaults))
        disabled = []
        for task in self._tasks():
            off = task.stats.disabled
            metrics.supervised_task_disabled.labels(task.name).set(1 if off else 0)
            if off:
                disabled.append(task.name)
        messages, errors, dead = self._counters()
        recent_messages, recent_errors, _ = self._recent(mono, messages, errors, dead, ERROR_RATE_WINDOW)
        _, _, dead_recent = self._recent(mono, messages, errors, dead, DEAD_LETTER_WINDOW)
        self._sample(mono, messages, errors, dead)
        breakers = tuple(app.board.snapshot())
        open_for = {name: mono - since for name, since in self._open_since.items()}
        rss = metrics.registry.get_sample_value("process_resident_memory_bytes")
        facts = Facts(
            at=now,
            breakers=breakers,
            open_for=open_for,
            queue=queue,
            storage_problem=storage_problem,
            datastore_defaults=defaults,
            disabled_tasks=tuple(disabled),
            rss_bytes=None if rss is None else int(rss),
            recent_messages=recent_messages,
            recent_errors=recent_errors,
            dead_letters_last_hour=dead_recent,
            mode=app.degradation.snapshot(),
            availability=availability,
        )
        return _with_problems(facts, self.app.config.degraded_queue_age_seconds)

    def _publish_availability(self, availability: Availability, today: int) -> None:
        current = availability.today if availability.today and availability.today.day == today else None
        ratio = availability.ratio_of(current)
        self.app.metrics.availability.set(1.0 if ratio is None else ratio)
        self.app.metrics.error_budget_remaining.set(availability.budget_left_of(current))

    def _counters(self) -> tuple[float, float, float]:
        metrics = self.app.metrics
        replays = metrics.total(metrics.messages, outcome="ignored_duplicate")
        messages = metrics.total(metrics.messages) - replays
        return messages, metrics.total(metrics.errors), metrics.total(metrics.queue_dead_letters)

    def _sample(self, mono: float, messages: float, errors: float, dead: float) -> None:
        if not self._samples or mono - self._samples[-1][0] >= SAMPLE_EVERY:
            self._samples.append((mono, messages, errors, dead))

    def _recent(
        self, mono: float, messages: float, errors: float, dead: float, window: float
    ) -> tuple[float, float, float]:
        """Growth of the counters since the newest sample at least ``window`` seconds old (since the
        process started, when it is younger: its counters started at 0)."""
        base = (0.0, 0.0, 0.0)
        for at, m, e, d in self._samples:
            if mono - at < window:
                break
            base = (m, e, d)
        return messages - base[0], errors - base[1], dead - base[2]

    # -- degraded mode and presence -------------------------------------------------------------

    def _apply_mode(self, facts: Facts) -> None:
        state = self.app.degradation
        mode = state.mode
        if mode is Mode.MAINTENANCE:
            return  # an operator's choice wins; the assessment resumes when it ends
        if facts.problems:
            state.set(Mode.DEGRADED, reason="; ".join(facts.problems))
        elif mode is Mode.DEGRADED:
            state.set(Mode.NORMAL)

    def presence_text(self) -> str | None:
        """What the bot's Discord status says now: None when all is well."""
        snap = self.app.degradation.snapshot()
        if snap.mode is Mode.MAINTENANCE:
            return "under maintenance: messages are saved"
        if snap.mode is Mode.DEGRADED:
            first = snap.reason.split("; ", 1)[0]
            return f"answers delayed: {first}"[:128]
        return None

    async def _show_presence(self) -> None:
        if self._presence is None:
            return
        text = self.presence_text()
        if text == self._shown and not self._presence_due:
            return
        try:
            async with asyncio.timeout(PRESENCE_TIMEOUT):
                await self._presence(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the gateway is down: the next run tries again
            log.info("health.presence_not_shown", error=type(exc).__name__)
            return
        if text != self._shown:
            log.info("health.presence", text=text)
        self._shown = text
        self._presence_due = False


def _with_problems(facts: Facts, queue_age_limit: float) -> Facts:
    """``facts`` with the reasons for degraded mode, most important first."""
    problems: list[str] = []
    for snap in facts.breakers:
        if snap.state is BreakerState.CLOSED or snap.name.startswith(QUIET_BREAKER_PREFIX):
            continue
        effect = BREAKER_EFFECTS.get(snap.name, f"{snap.name} failing")
        if effect not in problems:
            problems.append(effect)
    if facts.storage_problem is not None and "storage failing" not in problems:
        problems.append("storage failing")
    age = facts.queue.oldest_pending_age if facts.queue is not None else None
    if age is not None and age >= queue_age_limit:
        problems.append(f"queue backlog (oldest {texts.duration(age)})")
    if facts.datastore_defaults:
        problems.append(f"settings reset to defaults ({', '.join(facts.datastore_defaults)})")
    return replace(facts, problems=tuple(problems))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _name(consumer: Consumer) -> str:
    return getattr(consumer, "__qualname__", repr(consumer))
