"""Prometheus metrics for one application instance.

``Metrics`` owns its own ``CollectorRegistry`` (never the global default), so two instances
(two tests, two bots in one process) never share a value. Metric objects are plain
attributes; callers use them directly (``metrics.errors.labels(category).inc()``), plus a
few helpers where they save real work: ``observe_message``, ``observe_gemini``, ``observe_tokens``,
``set_queue_stats``, the listener hooks for breakers, the DataStore and the degradation
mode, and ``watch_retry_policy`` / ``watch_mutex``, which read the plain-int counters those
runtime objects keep when ``render()`` runs, so their hot paths pay nothing.

Every label value comes from a small fixed set (outcomes, categories, breaker names, route
templates, the configured models): never a user id, message id or conversation key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from resilience.degradation import DegradationSnapshot, ItemKind, ItemState, Mode, QueueStats
from resilience.errors import Category

MESSAGE_OUTCOMES = (
    "answered",
    "queued",
    "answered_late",
    "refused",
    "rate_limited",
    "maintenance",
    "error",
    "ignored_duplicate",
)
"""Outcomes pre-created at zero so dashboards see every series from the start."""

RETRY_OUTCOMES = ("retried", "denied_by_budget", "hint_too_long")

ALERT_DESTINATIONS = ("channel", "webhook", "dm")
ALERT_RESULTS = ("sent", "queued", "failed")
# The healer's actions (bot.healing) and how each ended: done, failed, or held back by the rate bound.
HEALING_KINDS = ("restart", "datastore", "gateway", "memory")
HEALING_OUTCOMES = ("done", "failed", "held")

COMMAND_OUTCOMES = ("ok", "refused", "timeout", "error", "not_acknowledged")
"""How a slash command ended: done; refused (who may not run it); took too long; failed (a
dependency or a bug, the user got a sentence); its interaction could not even be deferred."""
OTHER_COMMAND = "other"
"""The ``command`` label of a name not registered with ``set_commands`` (the label set stays bounded)."""
TOKEN_KINDS = ("prompt", "output", "thought", "cached")
"""Kinds of ``bot_gemini_tokens_total``: Gemini's usage_metadata prompt, candidates, thoughts and
cached-content token counts."""

DATASTORE_SOURCES = ("file", "bak", "memory", "backup", "defaults")

# 10 ms .. 60 s: a refusal takes milliseconds, an answer seconds, the processing timeout is 30 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# 1 ms .. 10 s: the default acquire timeout is 5 s.
MUTEX_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class RetrySource(Protocol):
    """What ``watch_retry_policy`` reads: ``resilience.retries.RetryPolicy`` fits."""

    name: str
    retries: int
    budget_denied: int
    hints_too_long: int

    @property
    def budget(self) -> Any: ...


class MutexSource(Protocol):
    """What ``watch_mutex`` reads: ``resilience.mutex.KeyedMutex`` fits."""

    waits: int
    timeouts: int
    wait_observer: Callable[[float], None] | None


def breaker_state_name(state: object) -> str:
    """Normalise a breaker state (str, StrEnum or pybreaker state object) to closed/half_open/open."""
    if not isinstance(state, str):
        state = getattr(state, "name", state)
    name = str(state).lower().replace("-", "_")
    if name not in _BREAKER_VALUES:
        raise ValueError(f"unknown breaker state {state!r}; expected one of {sorted(_BREAKER_VALUES)}")
    return name


class Metrics:
    """All of the bot's metrics on one private registry; ``render()`` is the exposition.

    Counters are named without ``_total`` (prometheus_client appends it). ``namespace``
    prefixes every family except the standard ``process_*`` / ``python_*`` ones.
    Also a registry service (``name``, ``depends_on``, ``start``/``stop``/``health``).
    """

    name = "metrics"
    depends_on: tuple[str, ...] = ()

    def __init__(self, namespace: str = "bot", *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        r, ns = self.registry, namespace

        # messages
        self.messages = Counter("messages", "Messages handled, by outcome.", ["outcome"],
                                namespace=ns, registry=r)
        self.message_latency = Histogram(
            "message_latency_seconds", "Time from receipt to the bot's reply or acknowledgement.",
            ["outcome"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        # gemini
        self.gemini_requests = Counter(
            "gemini_requests", "Gemini calls by outcome and HTTP status code ('none' without one).",
            ["outcome", "code"], namespace=ns, registry=r,
        )
        self.gemini_latency = Histogram(
            "gemini_latency_seconds", "Gemini call duration (one attempt).",
            ["outcome"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.gemini_tokens = Counter(
            "gemini_tokens",
            "Gemini tokens used (usage_metadata), by kind (prompt, output, thought, cached) and model.",
            ["kind", "model"], namespace=ns, registry=r,
        )
        # breakers
        self.breaker_state = Gauge("breaker_state", "Breaker state: 0 closed, 1 half-open, 2 open.",
                                   ["breaker"], namespace=ns, registry=r)
        self.breaker_transitions = Counter("breaker_transitions", "Breaker state transitions.",
                                           ["breaker", "from", "to"], namespace=ns, registry=r)
        # retries
        self.retries = Counter(
            "retries", "Retry decisions by dependency: retried, denied_by_budget, hint_too_long.",
            ["dependency", "outcome"], namespace=ns, registry=r,
        )
        self.retry_budget_tokens = Gauge("retry_budget_tokens", "Retry budget tokens available.",
                                         ["dependency"], namespace=ns, registry=r)
        # degradation queue
        self.queue_depth = Gauge("queue_depth", "Durable queue items by kind and state.",
                                 ["kind", "state"], namespace=ns, registry=r)
        self.queue_oldest_pending_age = Gauge(
            "queue_oldest_pending_age_seconds", "Age of the oldest pending queue item (0 when none).",
            namespace=ns, registry=r,
        )
        self.queue_dead_letters = Counter("queue_dead_letters", "Queue items dead-lettered.",
                                          ["kind"], namespace=ns, registry=r)
        self.queue_expired = Counter("queue_expired", "Queue items expired unanswered.",
                                     ["kind"], namespace=ns, registry=r)
        # conversation mutex
        self.mutex_waits = Counter("mutex_waits", "Conversation lock acquires that had to wait.",
                                   namespace=ns, registry=r)
        self.mutex_timeouts = Counter("mutex_timeouts", "Conversation lock acquires that timed out.",
                                      namespace=ns, registry=r)
        self.mutex_wait = Histogram("mutex_wait_seconds", "Time spent acquiring a conversation lock.",
                                    namespace=ns, registry=r, buckets=MUTEX_WAIT_BUCKETS)
        # datastore
        self.datastore_recoveries = Counter(
            "datastore_recoveries",
            "DataStore loads that recovered or reported problems, by the source that served.",
            ["source"], namespace=ns, registry=r,
        )
        self.datastore_alerts = Counter(
            "datastore_alerts", "DataStore files reset to defaults (corrupt).", namespace=ns, registry=r
        )
        # errors, mode, http api
        self.errors = Counter("errors", "Failures by category.", ["category"], namespace=ns, registry=r)
        self.maintenance_mode = Gauge("maintenance_mode", "1 while in maintenance mode.",
                                      namespace=ns, registry=r)
        self.degraded_mode = Gauge("degraded_mode", "1 while the health assessment finds the bot degraded.",
                                   namespace=ns, registry=r)
        self.http_requests = Counter("http_requests", "HTTP API requests by route template and status.",
                                     ["route", "status"], namespace=ns, registry=r)
        # health, alerts, incidents, availability (bot.health, bot.alerts, bot.incidents)
        self.supervised_task_disabled = Gauge(
            "supervised_task_disabled", "1 while a supervised background task has disabled itself.",
            ["task"], namespace=ns, registry=r,
        )
        self.storage_consecutive_failures = Gauge(
            "storage_consecutive_failures", "SQLite operations failed in a row (0 when the last one worked).",
            namespace=ns, registry=r,
        )
        self.datastore_defaults_files = Gauge(
            "datastore_defaults_files", "DataStore files serving defaults because no valid copy was left.",
            namespace=ns, registry=r,
        )
        self.alerts_firing = Gauge("alerts_firing", "Alerts firing now, by rule.", ["rule"],
                                   namespace=ns, registry=r)
        self.alert_notifications = Counter(
            "alert_notifications", "Alert messages by destination and result: sent, queued (durable queue, "
            "sent when Discord takes it), failed (kept and tried again).",
            ["destination", "result"], namespace=ns, registry=r,
        )
        self.healing_actions = Counter(
            "healing_actions", "The healer's actions by kind (restart, datastore, gateway, memory) and "
            "outcome: done, failed, held (the rate bound held it back).",
            ["kind", "outcome"], namespace=ns, registry=r,
        )
        self.incidents = Counter("incidents", "Incidents started (a breaker opened, degraded mode began).",
                                 ["dependency"], namespace=ns, registry=r)
        self.incident_mttr = Gauge("incident_mttr_seconds", "Mean time to recover of the recorded incidents.",
                                   ["dependency"], namespace=ns, registry=r)
        self.availability = Gauge(
            "availability_ratio", "Share of today's (UTC) accepted messages answered within 30 s.",
            namespace=ns, registry=r,
        )
        self.availability_slo = Gauge("availability_slo_ratio", "The objective (AVAILABILITY_SLO).",
                                      namespace=ns, registry=r)
        self.error_budget_remaining = Gauge(
            "error_budget_remaining_ratio",
            "Share of today's error budget left (1 untouched, 0 spent, below 0 overspent).",
            namespace=ns, registry=r,
        )
        # slash commands
        self.commands = Counter("commands", "Slash commands run, by command and outcome.",
                                ["command", "outcome"], namespace=ns, registry=r)
        self.command_latency = Histogram(
            "command_latency_seconds", "Time a slash command took, from receipt to its reply.",
            ["command"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        # functions the model calls (services.tools): tool names are a registry's, at most 64
        self.tool_calls = Counter("tool_calls", "Function calls the model asked for, by tool and outcome.",
                                  ["tool", "outcome"], namespace=ns, registry=r)
        self.tool_latency = Histogram("tool_latency_seconds", "Time one function call took.", ["tool"],
                                      namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.tool_rounds = Counter("tool_rounds", "Rounds of function calls in answers.", namespace=ns,
                                   registry=r)

        # Series that exist from the start, so a dashboard shows 0 rather than nothing.
        for outcome in MESSAGE_OUTCOMES:
            self.messages.labels(outcome)
        for source in DATASTORE_SOURCES:
            self.datastore_recoveries.labels(source)
        for category in Category:
            self.errors.labels(category)
        for destination in ALERT_DESTINATIONS:
            for result in ALERT_RESULTS:
                self.alert_notifications.labels(destination, result)
        for heal_kind in HEALING_KINDS:
            for heal_outcome in HEALING_OUTCOMES:
                self.healing_actions.labels(heal_kind, heal_outcome)
        for item_kind in ItemKind:
            self.queue_dead_letters.labels(item_kind)
            self.queue_expired.labels(item_kind)
        self._queue_keys: set[tuple[str, str]] = {(k.value, s.value) for k in ItemKind for s in ItemState}
        for kind_name, state_name in self._queue_keys:
            self.queue_depth.labels(kind_name, state_name)

        self._message_children: dict[str, tuple[Counter, Histogram]] = {}
        self._command_names: frozenset[str] = frozenset()
        self._token_children: dict[tuple[str, str], Counter] = {}
        self._retry_sources: dict[str, tuple[RetrySource, dict[str, int]]] = {}
        self._mutex_sources: list[tuple[MutexSource, dict[str, int]]] = []

        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # service protocol: nothing to open or close
    async def start(self) -> None:
        """Nothing to start; present so the registry can order services after metrics."""

    async def stop(self) -> None:
        """Nothing to stop."""

    def health(self) -> dict[str, Any]:
        return {"ok": True}

    # exposition
    def render(self) -> tuple[bytes, str]:
        """Refresh the watched counters and return ``(exposition, content_type)``."""
        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def refresh(self) -> None:
        """Pull the counters of watched retry policies and mutexes into the metrics."""
        for dependency, (policy, seen) in self._retry_sources.items():
            for outcome, value in (
                ("retried", policy.retries),
                ("denied_by_budget", policy.budget_denied),
                ("hint_too_long", policy.hints_too_long),
            ):
                self._add_delta(self.retries.labels(dependency, outcome), seen, outcome, value)
            if policy.budget is not None:
                self.retry_budget_tokens.labels(dependency).set(policy.budget.tokens)
        for mutex, seen in self._mutex_sources:
            self._add_delta(self.mutex_waits, seen, "waits", mutex.waits)
            self._add_delta(self.mutex_timeouts, seen, "timeouts", mutex.timeouts)

    @staticmethod
    def total(counter: Counter, **labels: str) -> float:
        """A counter's value summed over its children, or over those whose labels include ``labels``."""
        found = 0.0
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and labels.items() <= sample.labels.items():
                    found += sample.value
        return found

    @staticmethod
    def _add_delta(counter: Counter, seen: dict[str, int], key: str, value: int) -> None:
        """Add what ``value`` grew by since the last refresh (a reset source restarts from 0)."""
        last = seen.get(key, 0)
        delta = value - last if value >= last else value
        if delta > 0:
            counter.inc(delta)
        seen[key] = value

    # messages and gemini
    def observe_message(self, outcome: str, seconds: float) -> None:
        """Count one handled message and its latency under ``outcome`` (one of a fixed set)."""
        children = self._message_children.get(outcome)
        if children is None:
            # labels() takes a lock and rebuilds the label tuple: resolve each outcome once.
            children = self._message_children[outcome] = (
                self.messages.labels(outcome), self.message_latency.labels(outcome)
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_gemini(self, outcome: str, seconds: float, code: int | None = None) -> None:
        """Count one Gemini attempt with its HTTP ``code`` (None: no HTTP answer) and latency."""
        self.gemini_requests.labels(outcome, "none" if code is None else str(code)).inc()
        self.gemini_latency.labels(outcome).observe(seconds)

    def observe_tool(self, tool: str, outcome: str, seconds: float) -> None:
        """Count one function call of ``tool`` (a registered name or "unknown") and its time."""
        self.tool_calls.labels(tool, outcome).inc()
        self.tool_latency.labels(tool).observe(seconds)

    def watch_models(self, models: Iterable[str]) -> None:
        """Create the token series of ``models`` at 0 (the configured ones: a fixed, small set)."""
        for model in models:
            for kind in TOKEN_KINDS:
                self.gemini_tokens.labels(kind, model)

    def observe_tokens(
        self, model: str, *, prompt: int = 0, output: int = 0, thought: int = 0, cached: int = 0
    ) -> None:
        """Add one Gemini answer's ``usage_metadata`` under ``model``: ``prompt`` (input, ``cached``
        of it served from Gemini's cache), ``output`` (candidates) and ``thought`` tokens."""
        for kind, count in (("prompt", prompt), ("output", output), ("thought", thought), ("cached", cached)):
            if count:
                child = self._token_children.get((kind, model))
                if child is None:  # labels() takes a lock and rebuilds the tuple: once per series
                    child = self._token_children[(kind, model)] = self.gemini_tokens.labels(kind, model)
                child.inc(count)

    # slash commands
    def set_commands(self, names: Iterable[str]) -> None:
        """The slash commands' qualified names (``ask``, ``admin circuit reset``): the only values
        of the ``command`` label besides ``other``. Their series start at zero."""
        self._command_names = frozenset(names)
        for name in (*self._command_names, OTHER_COMMAND):
            self.command_latency.labels(name)
            for outcome in COMMAND_OUTCOMES:
                self.commands.labels(name, outcome)

    def observe_command(self, name: str, outcome: str, seconds: float) -> None:
        """Count one slash command run under ``outcome`` (one of ``COMMAND_OUTCOMES``) and its duration.

        A name not given to ``set_commands`` counts as ``other``, so no caller can grow the label set.
        """
        if name not in self._command_names:
            name = OTHER_COMMAND
        if outcome not in COMMAND_OUTCOMES:
            raise ValueError(f"unknown command outcome {outcome!r}; expected one of {COMMAND_OUTCOMES}")
        self.commands.labels(name, outcome).inc()
        self.command_latency.labels(name).observe(seconds)

    # breakers
    def set_breaker_state(self, name: str, state: object) -> None:
        """Set breaker ``name``'s gauge (for breakers that have not transitioned yet)."""
        self.breaker_state.labels(name).set(_BREAKER_VALUES[breaker_state_name(state)])

    def breaker_listener(self, name: str, old_state: object, new_state: object) -> None:
        """``BreakerBoard.add_listener`` hook: set the state gauge, count the transition.

        States may be strings, StrEnums or pybreaker state objects; "half-open" and
        "half_open" are the same state.
        """
        old, new = breaker_state_name(old_state), breaker_state_name(new_state)
        self.breaker_state.labels(name).set(_BREAKER_VALUES[new])
        self.breaker_transitions.labels(name, old, new).inc()

    # retries and mutexes (pulled at render time)
    def watch_retry_policy(self, policy: RetrySource, dependency: str | None = None) -> None:
        """Report ``policy``'s retry counters and budget under ``dependency`` (default: its name)."""
        dependency = dependency or policy.name
        self._retry_sources[dependency] = (policy, {})
        for outcome in RETRY_OUTCOMES:
            self.retries.labels(dependency, outcome)

    def watch_mutex(self, mutex: MutexSource) -> None:
        """Report ``mutex``'s waits and timeouts, and observe each wait's duration in
        ``mutex_wait_seconds`` (the mutex calls its ``wait_observer`` only when it had to wait)."""
        self._mutex_sources.append((mutex, {}))
        mutex.wait_observer = self.mutex_wait.observe

    # queue
    def set_queue_stats(self, stats: QueueStats) -> None:
        """Set queue depth and oldest-pending age; (kind, state) pairs missing from ``stats`` go to 0."""
        depth = {(str(k), str(s)): n for (k, s), n in stats.depth.items()}
        self._queue_keys.update(depth)
        for kind_name, state_name in self._queue_keys:
            self.queue_depth.labels(kind_name, state_name).set(depth.get((kind_name, state_name), 0))
        age = stats.oldest_pending_age
        self.queue_oldest_pending_age.set(age if age is not None else 0.0)

    # datastore
    def datastore_event(self, kind: str, data: dict[str, Any]) -> None:
        """``DataStore(on_event=...)`` hook: count recoveries by source and alerts; ignores other kinds.

        ``backup:<filename>`` counts as ``backup``; an alert (defaults served after corruption)
        counts as an alert and as a recovery from its source.
        """
        if kind not in ("datastore.recovered", "datastore.alert"):
            return
        source = str(data.get("source", "")).split(":", 1)[0]
        if source not in DATASTORE_SOURCES:
            source = "other"  # keep the label set bounded whatever a future DataStore reports
        self.datastore_recoveries.labels(source).inc()
        if kind == "datastore.alert":
            self.datastore_alerts.inc()

    # degradation mode
    def mode_listener(self, old: DegradationSnapshot, new: DegradationSnapshot) -> None:
        """``DegradationState.add_listener`` hook: keep the maintenance and degraded gauges in step."""
        self.set_maintenance(new.mode is Mode.MAINTENANCE)
        self.degraded_mode.set(1 if new.mode is Mode.DEGRADED else 0)

    def set_maintenance(self, on: bool) -> None:
        """Set the maintenance gauge to 1 (on) or 0."""
        self.maintenance_mode.set(1 if on else 0)
