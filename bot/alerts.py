"""Alerts: rules over the health assessment's facts, told once, repeated at a bounded pace, resolved.

Rules are small callables ``rule(facts, thresholds) -> firings`` (``RULES``): a breaker open longer
than ``ALERT_BREAKER_OPEN_SECONDS``, the queue's oldest item older than ``ALERT_QUEUE_AGE_SECONDS``,
``ALERT_DEAD_LETTERS_PER_HOUR`` dead letters in the last hour, DataStore files serving defaults, a
supervised task that disabled itself, storage failing, resident memory above ``ALERT_MEMORY_MB``,
failures above ``ALERT_ERROR_RATE`` of the messages of the last 5 minutes. Each firing has a key
(``breaker_open:gemini``); ``Alerter.evaluate`` (a consumer of ``bot.health.HealthMonitor``) turns
the keys that appear into a "firing" line, repeats a line every ``ALERT_REPEAT_SECONDS`` while the
key lasts, and a "resolved" line once when it is gone.

Never a storm: each assessment sends at most one message per destination, holding every line of
that assessment (a digest), and a key is told at most once per repeat interval. Never lost: each
destination has an outbox its lines stay in until it took them:

- the alert channel (``ALERT_CHANNEL_ID``) and the owners' DMs (``ALERT_DM_OWNERS``) go through
  ``DiscordIO`` and its breakers; what Discord does not take now is put in the durable queue as an
  outbound item (``SqliteStore.enqueue``), which the drain delivers once ``discord.send`` lets it;
- the webhook (``ALERT_WEBHOOK_URL``) is another route into Discord, with its own breaker
  (``alerts.webhook``): it still delivers while ``discord.send`` is open.

Alert states are kept in SQLite once every destination took their lines, so a restart neither
repeats an alert early nor forgets to say one is over; a line still waiting in memory when the
process dies (storage and the webhook both down) is told again after the restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import discord
import structlog

from bot.health import Facts
from bot.texts import duration
from resilience.breakers import Breaker
from resilience.degradation import ItemKind, ItemState
from resilience.errors import classify
from services.config import Config, webhook_parts
from services.storage import AlertRecord

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.alerts")

WEBHOOK_BREAKER = "alerts.webhook"
WEBHOOK_TIMEOUT = 10.0  # one webhook post, discord.py's own waits for its rate limits included
WEBHOOK_NAME = "Bot alerts"
MESSAGE_LIMIT = 1900  # characters per alert message (Discord's limit is 2,000; marks need room)
OUTBOX_LIMIT = 200  # lines kept per destination at most while it takes none
MIN_MESSAGES_FOR_RATE = 20  # the error-rate rule needs this many messages in its window
ALERT_KEY_PREFIX = "alerts:"  # conversation key of queued alert messages: apart from users' own


# --- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The limits the rules compare the facts with (from the ``ALERT_*`` settings)."""

    breaker_open_seconds: float = 60.0
    queue_age_seconds: float = 300.0
    dead_letters_per_hour: int = 1
    memory_bytes: int = 1024 * 2**20
    error_rate: float = 0.25
    min_messages: int = MIN_MESSAGES_FOR_RATE

    @classmethod
    def from_config(cls, config: Config) -> Thresholds:
        return cls(
            breaker_open_seconds=config.alert_breaker_open_seconds,
            queue_age_seconds=config.alert_queue_age_seconds,
            dead_letters_per_hour=config.alert_dead_letters_per_hour,
            memory_bytes=config.alert_memory_mb * 2**20,
            error_rate=config.alert_error_rate,
        )


@dataclass(frozen=True, slots=True)
class Firing:
    """One alert condition that holds now: ``key`` identifies it across assessments."""

    key: str
    rule: str
    title: str
    detail: str


Rule = Callable[[Facts, Thresholds], Iterable[Firing]]


def breaker_open(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    causes = {snap.name: snap for snap in facts.breakers}
    for name, seconds in sorted(facts.open_for.items()):
        if seconds >= limits.breaker_open_seconds:
            snap = causes.get(name)
            why = (snap.forced_reason or snap.last_error) if snap is not None else None
            detail = f"open for {duration(seconds)}" + (f", last error {why}" if why else "")
            yield Firing(f"breaker_open:{name}", "breaker_open", f"breaker {name} open", detail)


def queue_age(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    age = facts.queue.oldest_pending_age if facts.queue is not None else None
    if age is not None and age >= limits.queue_age_seconds:
        pending = facts.queue.pending() if facts.queue is not None else 0
        yield Firing("queue_age", "queue_age", "queue backing up",
                     f"{pending} waiting, the oldest for {duration(age)}")


def dead_letters(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    if facts.dead_letters_last_hour >= limits.dead_letters_per_hour:
        yield Firing("dead_letters", "dead_letters", "messages given up on",
                     f"{facts.dead_letters_last_hour:.0f} dead-lettered in the last hour "
                     "(their users were told)")


def datastore_defaults(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    if facts.datastore_defaults:
        yield Firing("datastore_defaults", "datastore_defaults", "settings reset to defaults",
                     f"no valid copy of {', '.join(facts.datastore_defaults)}: run datastore-recovery.sh")


def task_disabled(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    for name in facts.disabled_tasks:
        yield Firing(f"task_disabled:{name}", "task_disabled", f"background task {name} stopped",
                     "it failed too often in a row and disabled itself")


def storage_errors(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    if facts.storage_problem is not None:
        yield Firing("storage_errors", "storage_errors", "storage failing", facts.storage_problem)


def memory(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    if facts.rss_bytes is not None and facts.rss_bytes > limits.memory_bytes:
        yield Firing("memory", "memory", "memory high",
                     f"{facts.rss_bytes / 2**20:.0f} MiB resident "
                     f"(limit {limits.memory_bytes / 2**20:.0f} MiB)")


def error_rate(facts: Facts, limits: Thresholds) -> Iterable[Firing]:
    messages = facts.recent_messages
    if messages >= limits.min_messages and facts.recent_errors / messages > limits.error_rate:
        yield Firing("error_rate", "error_rate", "error rate high",
                     f"{facts.recent_errors:.0f} failures for {messages:.0f} messages in the last 5 min")


TITLES = {
    "queue_age": "queue backing up",
    "dead_letters": "messages given up on",
    "datastore_defaults": "settings reset to defaults",
    "storage_errors": "storage failing",
    "memory": "memory high",
    "error_rate": "error rate high",
}


def title_of(key: str) -> str:
    """The title of the alert ``key`` (for states taken up after a restart, which keep no title)."""
    rule, _, subject = key.partition(":")
    if rule == "breaker_open":
        return f"breaker {subject} open"
    if rule == "task_disabled":
        return f"background task {subject} stopped"
    return TITLES.get(rule, key)


RULES: tuple[Rule, ...] = (
    breaker_open, queue_age, dead_letters, datastore_defaults, task_disabled, storage_errors, memory,
    error_rate,
)
RULE_NAMES = tuple(rule.__name__ for rule in RULES)


# --- destinations ----------------------------------------------------------------------------------


class Destination(Protocol):
    """Where alert messages go: ``deliver`` returns True once the message is sent or durably queued."""

    key: str
    kind: str  # the metrics label: channel, webhook, dm

    async def deliver(self, text: str) -> bool: ...


class _DiscordDestination:
    """A destination the bot posts to with its own token, through ``DiscordIO`` and its breakers.

    What Discord does not take now goes to the durable queue (conversation ``alerts:<key>``, in
    order), and while an earlier message of it waits there, later ones queue behind it rather than
    overtake it (a "resolved" never arrives before its "alert").
    """

    kind = "channel"
    key = ""

    def __init__(self, app: Application) -> None:
        self.app = app
        self._queued: int | None = None  # the id of the last message queued, while it may wait

    async def _target(self) -> discord.abc.Messageable:
        raise NotImplementedError

    def _payload(self) -> dict[str, Any]:
        raise NotImplementedError

    async def deliver(self, text: str) -> bool:
        try:
            if await self._behind_queue():
                return await self._queue(text, "behind queued alerts")
            await self.app.discord_io.send(await self._target(), text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            if not verdict.retryable:
                log.error("alert.undeliverable", destination=self.key, category=verdict.category.value)
                self.app.metrics.alert_notifications.labels(self.kind, "failed").inc()
                return True  # no such channel, no permission: only an operator can mend it
            return await self._queue(text, verdict.category.value)
        self.app.metrics.alert_notifications.labels(self.kind, "sent").inc()
        return True

    async def _behind_queue(self) -> bool:
        if self._queued is None:
            return False
        item = await self.app.storage.get(self._queued)
        if item is not None and item.state in (ItemState.PENDING, ItemState.CLAIMED):
            return True
        self._queued = None
        return False

    async def _queue(self, text: str, reason: str) -> bool:
        """Put ``text`` in the durable queue as an outbound item; True once stored."""
        app = self.app
        message_id = _fresh_snowflake()
        payload: dict[str, Any] = {
            # An outbound item like the router's notices: the drain sends its chunks once Discord
            # takes them. The id is a snowflake of now: no message has it, so the "reply" goes out
            # as a plain message (fail_if_not_exists is off) and a look back for it starts from now.
            "message_id": message_id,
            "guild_id": None,
            "content": "",
            "chunks": [text],
            "chunk_offset": 0,
            "outcome": "refused",
            "notice": True,
            "alert": True,
            "nonce": f"a{message_id}",
            **self._payload(),
        }
        try:
            item = await app.storage.enqueue(
                ItemKind.OUTBOUND, ALERT_KEY_PREFIX + self.key, payload, now=app.clock.time(),
                dedup_key=f"alert:{self.key}:{message_id}",
            )
        except asyncio.CancelledError:
            raise
        except Exception as failure:
            category = classify(failure).category.value
            log.warning("alert.not_queued", destination=self.key, category=category)
            app.metrics.alert_notifications.labels(self.kind, "failed").inc()
            return False
        self._queued = item.id
        log.info("alert.queued", destination=self.key, reason=reason)
        app.metrics.alert_notifications.labels(self.kind, "queued").inc()
        app.drain_wake()
        return True


_last_snowflake = 0


def _fresh_snowflake() -> int:
    """A snowflake of now, never one handed out before in this process: two alerts queued in the same
    millisecond would otherwise share their dedup key (the second one found the first and was lost)
    and their nonce."""
    global _last_snowflake
    _last_snowflake = max(discord.utils.time_snowflake(discord.utils.utcnow()), _last_snowflake + 1)
    return _last_snowflake


class ChannelDestination(_DiscordDestination):
    """The alert channel (``discord.read`` to find it, ``discord.send`` to post)."""

    kind = "channel"

    def __init__(self, app: Application, channel_id: int) -> None:
        super().__init__(app)
        self.channel_id = channel_id
        self.key = f"channel:{channel_id}"

    async def _target(self) -> discord.abc.Messageable:
        channel: discord.abc.Messageable = await self.app.channel(self.channel_id)
        return channel

    def _payload(self) -> dict[str, Any]:
        return {"channel_id": self.channel_id, "author_id": self.app.bot_user_id() or 0, "private": False}


class DmDestination(_DiscordDestination):
    """One owner's DMs (``discord.read`` to open the DM, ``discord.send`` to post)."""

    kind = "dm"

    def __init__(self, app: Application, user_id: int) -> None:
        super().__init__(app)
        self.user_id = user_id
        self.key = f"dm:{user_id}"

    async def _target(self) -> discord.abc.Messageable:
        client = self.app.client
        if client is None:
            raise ConnectionError("the Discord client is not attached")
        return await self.app.discord_io.dm_channel(client, self.user_id)

    def _payload(self) -> dict[str, Any]:
        # private: the drain opens the DM with author_id (the owner) to deliver it.
        return {"channel_id": self.user_id, "author_id": self.user_id, "private": True}


class WebhookDestination:
    """An incoming webhook: a route into Discord apart from the bot's own sends, behind its own breaker.

    The webhook's id and token come from its URL; requests go to Discord's API base (discord.py's
    ``Route.BASE``, which ``DISCORD_API_BASE`` moves), in a session of its own.
    """

    kind = "webhook"
    key = "webhook"

    def __init__(self, app: Application, url: str, breaker: Breaker) -> None:
        self.app = app
        self.webhook_id, self._token = webhook_parts(url)
        self.breaker = breaker
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, text: str) -> bool:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        webhook = discord.Webhook.partial(self.webhook_id, self._token, session=self._session)
        try:
            await self.breaker.call(
                webhook.send,
                text,
                username=WEBHOOK_NAME,
                allowed_mentions=discord.AllowedMentions.none(),
                wait=True,
                timeout=WEBHOOK_TIMEOUT,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            log.warning("alert.webhook_failed", category=verdict.category.value, error=type(exc).__name__)
            self.app.metrics.alert_notifications.labels(self.kind, "failed").inc()
            return False
        self.app.metrics.alert_notifications.labels(self.kind, "sent").inc()
        return True

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# --- the alerter ----------------------------------------------------------------------------------


@dataclass
class _State:
    key: str
    rule: str
    title: str
    detail: str
    since: float
    notified_at: float | None = None
    resolved_at: float | None = None


class Alerter:
    """Evaluates the rules after each health assessment and tells the destinations (see the module)."""

    def __init__(
        self,
        app: Application,
        *,
        owners: Callable[[], Collection[int]] = frozenset,
        webhook_breaker: Breaker | None = None,
        rules: tuple[Rule, ...] = RULES,
        thresholds: Thresholds | None = None,
    ) -> None:
        cfg = app.config
        self.app = app
        self.rules = rules
        self.thresholds = thresholds or Thresholds.from_config(cfg)
        self.repeat = cfg.alert_repeat_seconds
        self._owners = owners
        self.channel = ChannelDestination(app, cfg.alert_channel_id) if cfg.alert_channel_id else None
        self.webhook: WebhookDestination | None = None
        if cfg.alert_webhook_url:
            breaker = webhook_breaker or app.board.add(WEBHOOK_BREAKER, fail_max=3)
            self.webhook = WebhookDestination(app, cfg.alert_webhook_url, breaker)
        self._dms: dict[int, DmDestination] = {}
        self._states: dict[str, _State] = {}
        self._outboxes: dict[str, list[str]] = {}
        self._unsaved = False
        for rule in RULE_NAMES:
            app.metrics.alerts_firing.labels(rule).set(0)

    def destinations(self) -> list[Destination]:
        found: list[Destination] = []
        if self.channel is not None:
            found.append(self.channel)
        if self.webhook is not None:
            found.append(self.webhook)
        if self.app.config.alert_dm_owners:
            for user in sorted(self._owners()):
                if user not in self._dms:
                    self._dms[user] = DmDestination(self.app, user)
                found.append(self._dms[user])
        return found

    async def load(self) -> None:
        """Take up the alert states a previous process kept (at start-up; storage errors are logged)."""
        try:
            stored = await self.app.storage.alert_states()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("alert.states_unreadable", category=classify(exc).category.value)
            return
        for record in stored:
            rule = record.key.split(":", 1)[0]
            state = _State(record.key, rule, title_of(record.key), record.detail, record.since,
                           record.notified_at, record.resolved_at)
            self._states[record.key] = state
            if record.resolved_at is not None:  # its resolution was never confirmed: tell it again
                self._post(_resolved_line(state, record.resolved_at))
        self._publish()

    async def close(self) -> None:
        if self.webhook is not None:
            await self.webhook.close()

    def firing(self) -> list[dict[str, Any]]:
        """The alerts firing now, for the health views."""
        return [
            {"key": s.key, "rule": s.rule, "title": s.title, "detail": s.detail, "since": s.since,
             "notified_at": s.notified_at}
            for s in self._states.values()
            if s.resolved_at is None
        ]

    async def evaluate(self, facts: Facts) -> None:
        """One round: compare the rules with ``facts``, post the lines, deliver, keep the states."""
        now = facts.at
        active: dict[str, Firing] = {}
        for rule in self.rules:
            for firing in rule(facts, self.thresholds):
                active[firing.key] = firing
        for key, firing in active.items():
            state = self._states.get(key)
            if state is None or state.resolved_at is not None:
                state = self._states[key] = _State(key, firing.rule, firing.title, firing.detail, now)
                self._post(f"\N{LARGE RED CIRCLE} **Alert: {firing.title}**: {firing.detail}")
                log.warning("alert.firing", alert=key, detail=firing.detail)
                state.notified_at = now
                self._unsaved = True
            else:
                state.detail = firing.detail
                if state.notified_at is None or now - state.notified_at >= self.repeat:
                    self._post(
                        f"\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS} **Still firing: "
                        f"{state.title}** (since {duration(now - state.since)} ago): {firing.detail}"
                    )
                    state.notified_at = now
                    self._unsaved = True
        for key, state in self._states.items():
            if key not in active and state.resolved_at is None:
                state.resolved_at = now
                self._post(_resolved_line(state, now))
                log.info("alert.resolved", alert=key, seconds=round(now - state.since, 3))
                self._unsaved = True
        self._publish()
        await self.deliver()
        await self._save()

    def _post(self, line: str) -> None:
        for destination in self.destinations():
            box = self._outboxes.setdefault(destination.key, [])
            box.append(line)
            if len(box) > OUTBOX_LIMIT:
                del box[: len(box) - OUTBOX_LIMIT]
                log.error("alert.lines_dropped", destination=destination.key, kept=OUTBOX_LIMIT)

    async def deliver(self) -> None:
        """Send each destination's waiting lines: one message per destination (more only when the
        lines do not fit in one); a destination that refuses keeps its lines for the next round."""
        for destination in self.destinations():
            box = self._outboxes.get(destination.key)
            while box:
                text, count = _message(box)
                if not await destination.deliver(text):
                    break
                del box[:count]

    def pending(self) -> int:
        """Lines waiting for a destination to take them."""
        return sum(len(box) for box in self._outboxes.values())

    async def _save(self) -> None:
        if not self._unsaved or self.pending():
            return  # a destination has not taken its lines yet: after a restart, tell them again
        firing = [s for s in self._states.values() if s.resolved_at is None]
        gone = [s.key for s in self._states.values() if s.resolved_at is not None]
        try:
            await self.app.storage.save_alert_states(
                [AlertRecord(s.key, s.detail, s.since, s.notified_at, None) for s in firing], delete=gone
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("alert.states_not_saved", category=classify(exc).category.value)
            return
        for key in gone:
            self._states.pop(key, None)
        self._unsaved = False

    def _publish(self) -> None:
        counts = dict.fromkeys(RULE_NAMES, 0)
        for state in self._states.values():
            if state.resolved_at is None and state.rule in counts:
                counts[state.rule] += 1
        for rule, n in counts.items():
            self.app.metrics.alerts_firing.labels(rule).set(n)


def _resolved_line(state: _State, now: float) -> str:
    return f"\N{WHITE HEAVY CHECK MARK} **Resolved: {state.title}** after {duration(now - state.since)}"


def _message(lines: list[str]) -> tuple[str, int]:
    """The first message of ``lines`` within ``MESSAGE_LIMIT`` and how many lines it holds."""
    text, count = "", 0
    for line in lines:
        line = line[:MESSAGE_LIMIT]
        candidate = f"{text}\n{line}" if text else line
        if count and len(candidate) > MESSAGE_LIMIT:
            break
        text, count = candidate, count + 1
    return text, count
