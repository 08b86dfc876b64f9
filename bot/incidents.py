"""Incident records: every episode of an open breaker and of degraded mode, with what it cost.

``IncidentTracker`` hears breaker transitions (``BreakerBoard.add_listener``) and mode changes
(``DegradationState.add_listener``) as they happen, and keeps each episode in memory: a breaker
leaving closed starts one (half-open and open again stay in it), closing ends it; degraded mode
starts one, leaving it ends it. Its figures: ``queued``, the messages queued while it lasted (or,
if more, the most items waiting at once at an assessment during it: those queued just before the
breaker opened wait for it too); and from the bot's counters taken at its start, ``answered_after``
(queued messages answered from its start until it settled) and ``dead_lettered`` (items given up
on in that time). An ended
episode settles when the queue has nothing pending, or ``SETTLE_SECONDS`` after it ended.

Each health assessment calls ``update``: it refreshes the figures and writes every changed
episode to SQLite (``SqliteStore.save_incident``). While storage is down (its own incident) the
episodes wait in memory and are written once it is back. At start-up, ``recover`` ends the
episodes a dead process left open. ``report`` gives, per dependency, the count, MTTR (mean time
from start to end) and MTBF (mean time from the end of one incident to the start of the next).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog

from bot.health import Facts
from resilience.breakers import BreakerState
from resilience.degradation import DegradationSnapshot, Mode
from resilience.errors import classify
from services.storage import INCIDENTS_MAX, IncidentRecord

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.incidents")

SETTLE_SECONDS = 900.0  # an ended incident's queue figures stop growing this long after it ended
MAX_UNSAVED = 200  # episodes kept in memory at most while storage cannot take them
DEGRADED = "degraded"
RESTARTED = "the bot restarted during this incident; its figures cover the time before"


@dataclass
class _Episode:
    record: IncidentRecord
    queued_at_start: float
    late_at_start: float
    dead_at_start: float
    peak_pending: int = 0
    dirty: bool = True


class IncidentTracker:
    """Records incidents of ``app``'s breakers and degraded mode (see the module's docstring)."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self._open: dict[str, _Episode] = {}  # by key: "breaker:<name>" or "degraded"
        self._settling: list[_Episode] = []
        for name in app.board.names():
            app.metrics.incidents.labels(name)
        app.metrics.incidents.labels(DEGRADED)

    # -- listeners (synchronous: they run inside the transition) ---------------------------------

    def breaker_listener(self, name: str, old: BreakerState, new: BreakerState) -> None:
        key = f"breaker:{name}"
        if old is BreakerState.CLOSED and new is not BreakerState.CLOSED:
            cause = self.app.board[name].transition_cause
            self._start(key, "breaker", name, cause)
        elif new is BreakerState.CLOSED:
            self._end(key, None)

    def mode_listener(self, old: DegradationSnapshot, new: DegradationSnapshot) -> None:
        if new.mode is Mode.DEGRADED and old.mode is not Mode.DEGRADED:
            self._start(DEGRADED, DEGRADED, DEGRADED, new.reason or "degraded")
        elif old.mode is Mode.DEGRADED and new.mode is not Mode.DEGRADED:
            note = "maintenance began" if new.mode is Mode.MAINTENANCE else None
            self._end(DEGRADED, note)

    def _start(self, key: str, kind: str, dependency: str, cause: str) -> None:
        if key in self._open:
            return
        now = self.app.clock.time()
        queued, late, dead = self._counters()
        record = IncidentRecord(kind=kind, dependency=dependency, cause=cause[:300], started_at=now)
        self._open[key] = _Episode(record, queued, late, dead)
        self.app.metrics.incidents.labels(dependency).inc()
        log.warning("incident.started", kind=kind, dependency=dependency, cause=cause)

    def _end(self, key: str, note: str | None) -> None:
        episode = self._open.pop(key, None)
        if episode is None:
            return
        now = self.app.clock.time()
        self._refresh(episode, ended=True)
        episode.record = replace(episode.record, ended_at=now, note=note)
        episode.dirty = True
        self._settling.append(episode)
        log.info(
            "incident.ended",
            kind=episode.record.kind,
            dependency=episode.record.dependency,
            seconds=round(now - episode.record.started_at, 3),
            queued=episode.record.queued,
        )

    # -- figures and persistence -----------------------------------------------------------------

    def _counters(self) -> tuple[float, float, float]:
        metrics = self.app.metrics
        return (
            metrics.total(metrics.messages, outcome="queued"),
            metrics.total(metrics.messages, outcome="answered_late"),
            metrics.total(metrics.queue_dead_letters),
        )

    def _refresh(self, episode: _Episode, *, ended: bool = False) -> None:
        queued, late, dead = self._counters()
        record = episode.record
        during = max(int(queued - episode.queued_at_start), episode.peak_pending)
        updated = replace(
            record,
            queued=record.queued if record.ended_at is not None else during,
            answered_after=int(late - episode.late_at_start),
            dead_lettered=int(dead - episode.dead_at_start),
        )
        if updated != record:
            episode.record = updated
            episode.dirty = True

    async def update(self, facts: Facts) -> None:
        """Refresh the figures, settle what the queue has worked off, and write what changed."""
        now = facts.at
        pending = facts.queue.pending() if facts.queue is not None else None
        for episode in self._open.values():
            if pending is not None:
                episode.peak_pending = max(episode.peak_pending, pending)
            self._refresh(episode)
        for episode in self._settling:
            self._refresh(episode)
            ended = episode.record.ended_at or now
            if pending == 0 or now - ended >= SETTLE_SECONDS:
                episode.record = replace(episode.record, settled_at=now)
                episode.dirty = True
        await self.flush()
        await self.report(limit=0)  # keeps bot_incident_mttr_seconds current

    async def flush(self) -> None:
        """Write every changed episode; what storage refuses stays in memory for the next call."""
        for episode in [*self._open.values(), *self._settling]:
            if not episode.dirty:
                continue
            try:
                new_id = await self.app.storage.save_incident(episode.record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("incident.not_saved", category=classify(exc).category.value)
                break  # storage is down: keep them all for the next assessment
            episode.record = replace(episode.record, id=new_id)
            episode.dirty = False
        self._settling = [e for e in self._settling if e.dirty or e.record.settled_at is None]
        if len(self._settling) > MAX_UNSAVED:
            dropped = self._settling[:-MAX_UNSAVED]
            self._settling = self._settling[-MAX_UNSAVED:]
            log.error("incident.records_dropped", count=len(dropped), reason="storage down too long")

    async def recover(self) -> int:
        """End the incidents a dead process left open (at start-up, before any new one starts)."""
        closed = await self.app.storage.close_open_incidents(now=self.app.clock.time(), note=RESTARTED)
        if closed:
            log.info("incident.recovered", closed=closed)
        return closed

    # -- the report ----------------------------------------------------------------------------

    def open_incidents(self) -> list[IncidentRecord]:
        """Incidents still going on, from memory (also while storage is down)."""
        return [e.record for e in self._open.values()]

    async def report(self, *, limit: int = 20) -> dict[str, Any]:
        """``{dependencies: [{dependency, incidents, open, mttr_seconds, mtbf_seconds, ...}],
        incidents: [newest first], open: [...], stored: bool}``. Without storage, only what is
        in memory (``stored`` false)."""
        stored = True
        rows: list[IncidentRecord] = []
        try:
            rows = await self.app.storage.incidents(limit=INCIDENTS_MAX)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stored = False
            log.info("incident.report_without_storage", category=classify(exc).category.value)
        memory = [e.record for e in [*self._open.values(), *self._settling]]
        # What memory holds is newer than its stored copy (or has none yet).
        in_memory = {m.id for m in memory if m.id is not None}
        rows = [r for r in rows if r.id not in in_memory] + memory
        rows.sort(key=lambda r: (r.started_at, r.id or 0), reverse=True)
        summary = summarise(rows)
        for row in summary:
            if row["mttr_seconds"] is not None:
                self.app.metrics.incident_mttr.labels(row["dependency"]).set(row["mttr_seconds"])
        return {
            "stored": stored,
            "dependencies": summary,
            "open": [as_dict(r) for r in rows if r.ended_at is None],
            "incidents": [as_dict(r) for r in rows[:limit]],
        }


def summarise(rows: list[IncidentRecord]) -> list[dict[str, Any]]:
    """Per dependency: incidents, open ones, MTTR (mean start-to-end of ended ones), MTBF (mean end
    of one to start of the next), and the totals of queued, answered after and dead-lettered."""
    by_dependency: dict[str, list[IncidentRecord]] = {}
    for row in rows:
        by_dependency.setdefault(row.dependency, []).append(row)
    out = []
    for dependency, items in sorted(by_dependency.items()):
        items = sorted(items, key=lambda r: r.started_at)
        ended = [r for r in items if r.ended_at is not None]
        repairs = [r.ended_at - r.started_at for r in ended if r.ended_at is not None]
        gaps = [
            later.started_at - earlier.ended_at
            for earlier, later in itertools.pairwise(items)
            if earlier.ended_at is not None
        ]
        out.append(
            {
                "dependency": dependency,
                "incidents": len(items),
                "open": len(items) - len(ended),
                "mttr_seconds": round(sum(repairs) / len(repairs), 3) if repairs else None,
                "mtbf_seconds": round(sum(gaps) / len(gaps), 3) if gaps else None,
                "last_started_at": items[-1].started_at,
                "queued": sum(r.queued for r in items),
                "answered_after": sum(r.answered_after for r in items),
                "dead_lettered": sum(r.dead_lettered for r in items),
            }
        )
    return out


def as_dict(record: IncidentRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind,
        "dependency": record.dependency,
        "cause": record.cause,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "settled_at": record.settled_at,
        "seconds": None if record.ended_at is None else round(record.ended_at - record.started_at, 3),
        "queued": record.queued,
        "answered_after": record.answered_after,
        "dead_lettered": record.dead_lettered,
        "note": record.note,
    }
