"""Tests for services.metrics: isolation, exposition, and the hooks other parts call."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resilience.breakers import BreakerBoard, BreakerState
from resilience.clock import FakeClock
from resilience.degradation import DegradationState, ItemKind, ItemState, Mode, QueueStats
from resilience.errors import Category, Classification, MutexTimeoutError, RetryHintTooLongError
from resilience.mutex import KeyedMutex
from resilience.retries import RetryBudget, RetryPolicy
from services.datastore import DataStore, FileSpec
from services.metrics import Metrics, breaker_state_name

# Family names as the parser reports them (counters without their _total suffix).
EXPECTED_FAMILIES = {
    "bot_messages": "counter",
    "bot_message_latency_seconds": "histogram",
    "bot_gemini_requests": "counter",
    "bot_gemini_latency_seconds": "histogram",
    "bot_gemini_tokens": "counter",
    "bot_breaker_state": "gauge",
    "bot_breaker_transitions": "counter",
    "bot_retries": "counter",
    "bot_retry_budget_tokens": "gauge",
    "bot_queue_depth": "gauge",
    "bot_queue_oldest_pending_age_seconds": "gauge",
    "bot_queue_dead_letters": "counter",
    "bot_queue_expired": "counter",
    "bot_mutex_waits": "counter",
    "bot_mutex_timeouts": "counter",
    "bot_mutex_wait_seconds": "histogram",
    "bot_datastore_recoveries": "counter",
    "bot_datastore_alerts": "counter",
    "bot_errors": "counter",
    "bot_maintenance_mode": "gauge",
    "bot_http_requests": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "python_info": "gauge",
    "python_gc_objects_collected": "counter",
}


@pytest.fixture
def metrics() -> Metrics:
    """A fresh Metrics instance with its own registry."""
    return Metrics()


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``m.render()`` keyed by (sample name, labels), parsed from the text."""
    body, _ = m.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(m: Metrics, name: str, **labels: str) -> float | None:
    """The value of one sample in the exposition, or None when it is absent."""
    return samples(m).get((name, frozenset(labels.items())))


def test_two_instances_do_not_share_values() -> None:
    """Counting on one Metrics leaves another untouched (no global registry)."""
    a, b = Metrics(), Metrics()
    a.observe_message("answered", 0.2)
    a.set_maintenance(True)
    assert value(a, "bot_messages_total", outcome="answered") == 1
    assert value(b, "bot_messages_total", outcome="answered") == 0
    assert value(b, "bot_maintenance_mode") == 0
    assert a.registry is not b.registry


def test_every_family_is_exposed_with_its_type_and_parses(metrics: Metrics) -> None:
    """render() returns the text format with every family, each of the expected type."""
    metrics.observe_gemini("ok", 1.2, 200)
    metrics.observe_tokens("gemini-2.5-flash", prompt=10, output=5)
    metrics.breaker_listener("gemini", "closed", "open")
    metrics.http_requests.labels("/health", "200").inc()
    metrics.errors.labels(Category.TIMEOUT).inc()
    metrics.retries.labels("gemini", "retried").inc()
    metrics.retry_budget_tokens.labels("gemini").set(3)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    missing = {n: t for n, t in EXPECTED_FAMILIES.items() if families.get(n) != t}
    assert not missing, f"missing or mistyped: {missing}"


def test_counter_names_end_in_total_in_the_exposition(metrics: Metrics) -> None:
    """Every bot counter's sample lines are name_total (prometheus_client adds the suffix once)."""
    text = metrics.render()[0].decode()
    counter_types = [line.split()[2] for line in text.splitlines() if line.endswith(" counter")]
    assert "bot_messages_total" in counter_types
    for name in counter_types:
        assert name.endswith("_total") and not name.endswith("_total_total"), name
    bot_counters = [n for n, t in EXPECTED_FAMILIES.items() if t == "counter" and n.startswith("bot_")]
    for family in bot_counters:
        assert f"# TYPE {family}_total counter" in text


def test_preset_series_show_zero_before_anything_happens(metrics: Metrics) -> None:
    """Known outcomes, categories, sources and queue pairs exist at 0 from the start."""
    got = samples(metrics)
    assert got[("bot_messages_total", frozenset({("outcome", "queued")}))] == 0
    assert got[("bot_errors_total", frozenset({("category", "circuit_open")}))] == 0
    assert got[("bot_datastore_recoveries_total", frozenset({("source", "bak")}))] == 0
    assert got[("bot_queue_depth", frozenset({("kind", "outbound"), ("state", "dead")}))] == 0


def test_message_latency_lands_in_the_right_buckets(metrics: Metrics) -> None:
    """A 0.3 s answer is counted in the le=0.5 bucket and above, not in le=0.25."""
    metrics.observe_message("answered", 0.3)
    metrics.observe_message("answered", 45.0)
    got = samples(metrics)

    def bucket(le: str) -> float:
        return got[("bot_message_latency_seconds_bucket", frozenset({("outcome", "answered"), ("le", le)}))]

    assert bucket("0.01") == 0
    assert bucket("0.25") == 0
    assert bucket("0.5") == 1
    assert bucket("30.0") == 1
    assert bucket("60.0") == 2
    assert bucket("+Inf") == 2
    labels = frozenset({("outcome", "answered")})
    assert got[("bot_message_latency_seconds_count", labels)] == 2
    assert got[("bot_message_latency_seconds_sum", labels)] == pytest.approx(45.3)
    assert got[("bot_messages_total", labels)] == 2


def test_gemini_observation_counts_code_latency_and_tokens(metrics: Metrics) -> None:
    """observe_gemini labels the HTTP code ('none' without one); observe_tokens adds usage_metadata's
    tokens by kind and model, and watch_models creates the configured models' series at 0."""
    metrics.observe_gemini("ok", 0.8, 200)
    metrics.observe_gemini("timeout", 30.0)
    metrics.observe_gemini("rate_limited", 0.05, 429)
    metrics.watch_models(["gemini-2.5-flash", "gemini-2.0-flash"])
    metrics.observe_tokens("gemini-2.5-flash", prompt=12, output=30, thought=7, cached=5)
    assert value(metrics, "bot_gemini_requests_total", outcome="ok", code="200") == 1
    assert value(metrics, "bot_gemini_requests_total", outcome="timeout", code="none") == 1
    assert value(metrics, "bot_gemini_requests_total", outcome="rate_limited", code="429") == 1
    flash = {"model": "gemini-2.5-flash"}
    assert value(metrics, "bot_gemini_tokens_total", kind="prompt", **flash) == 12
    assert value(metrics, "bot_gemini_tokens_total", kind="output", **flash) == 30
    assert value(metrics, "bot_gemini_tokens_total", kind="thought", **flash) == 7
    assert value(metrics, "bot_gemini_tokens_total", kind="cached", **flash) == 5
    assert value(metrics, "bot_gemini_tokens_total", kind="output", model="gemini-2.0-flash") == 0
    assert value(metrics, "bot_gemini_latency_seconds_count", outcome="timeout") == 1


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("closed", "closed"),
        ("open", "open"),
        ("half_open", "half_open"),
        ("half-open", "half_open"),
        (BreakerState.HALF_OPEN, "half_open"),
        (BreakerState.OPEN, "open"),
    ],
)
def test_breaker_state_names_accept_both_half_open_spellings(state: object, expected: str) -> None:
    """Strings and StrEnums, with - or _, normalise to one label value."""
    assert breaker_state_name(state) == expected


def test_breaker_state_name_rejects_unknown_states() -> None:
    """An unknown state is an error, not a new unbounded label value."""
    with pytest.raises(ValueError, match="unknown breaker state"):
        breaker_state_name("exploded")


def test_breaker_listener_maps_states_and_counts_transitions(metrics: Metrics) -> None:
    """closed->open->half-open->closed sets the gauge 2, 1, 0 and counts each transition."""
    metrics.breaker_listener("gemini", "closed", "open")
    assert value(metrics, "bot_breaker_state", breaker="gemini") == 2
    metrics.breaker_listener("gemini", BreakerState.OPEN, "half-open")
    assert value(metrics, "bot_breaker_state", breaker="gemini") == 1
    metrics.breaker_listener("gemini", "half_open", BreakerState.CLOSED)
    assert value(metrics, "bot_breaker_state", breaker="gemini") == 0
    metrics.breaker_listener("gemini", "closed", "open")
    transitions = {"breaker": "gemini", "from": "closed", "to": "open"}
    assert value(metrics, "bot_breaker_transitions_total", **transitions) == 2
    back = {"breaker": "gemini", "from": "open", "to": "half_open"}
    assert value(metrics, "bot_breaker_transitions_total", **back) == 1


async def test_breaker_listener_hears_a_real_board(metrics: Metrics) -> None:
    """Hooked into a BreakerBoard, failures that trip a breaker show as state 2 and a transition."""
    clock = FakeClock()
    board = BreakerBoard(clock, fail_max=2, reset_timeout=10.0)
    board.add_listener(metrics.breaker_listener)
    breaker = board.add("discord.send")

    async def fail() -> None:
        raise ConnectionError("down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(fail)
    assert breaker.state is BreakerState.OPEN
    assert value(metrics, "bot_breaker_state", breaker="discord.send") == 2
    assert value(metrics, "bot_breaker_transitions_total", breaker="discord.send", to="open",
                 **{"from": "closed"}) == 1


def test_set_queue_stats_sets_depth_and_zeroes_vanished_pairs(metrics: Metrics) -> None:
    """A (kind, state) pair missing from the next stats drops to 0; the age follows, None -> 0."""
    metrics.set_queue_stats(QueueStats(
        {(ItemKind.INBOUND, ItemState.PENDING): 4, (ItemKind.OUTBOUND, ItemState.DEAD): 1},
        oldest_pending_age=12.5,
    ))
    assert value(metrics, "bot_queue_depth", kind="inbound", state="pending") == 4
    assert value(metrics, "bot_queue_depth", kind="outbound", state="dead") == 1
    assert value(metrics, "bot_queue_oldest_pending_age_seconds") == 12.5

    metrics.set_queue_stats(QueueStats({(ItemKind.INBOUND, ItemState.CLAIMED): 2}, oldest_pending_age=None))
    assert value(metrics, "bot_queue_depth", kind="inbound", state="pending") == 0
    assert value(metrics, "bot_queue_depth", kind="outbound", state="dead") == 0
    assert value(metrics, "bot_queue_depth", kind="inbound", state="claimed") == 2
    assert value(metrics, "bot_queue_oldest_pending_age_seconds") == 0


@pytest.mark.parametrize(
    ("kind", "source", "label"),
    [
        ("datastore.recovered", "bak", "bak"),
        ("datastore.recovered", "backup:settings-20261123T104700.000000.json", "backup"),
        ("datastore.recovered", "file", "file"),
        ("datastore.recovered", "memory", "memory"),
        ("datastore.alert", "defaults", "defaults"),
        ("datastore.recovered", "tape", "other"),
    ],
)
def test_datastore_event_normalises_the_source(metrics: Metrics, kind: str, source: str, label: str) -> None:
    """backup:<file> counts as backup; an unknown source as other; only alerts count as alerts."""
    metrics.datastore_event(kind, {"name": "settings", "source": source, "alert": kind == "datastore.alert"})
    assert value(metrics, "bot_datastore_recoveries_total", source=label) == 1
    assert value(metrics, "bot_datastore_alerts_total") == (1 if kind == "datastore.alert" else 0)


def test_datastore_event_ignores_other_kinds(metrics: Metrics) -> None:
    """Events the store may add later do not count as recoveries."""
    metrics.datastore_event("datastore.saved", {"source": "file"})
    assert sum(v for (n, _), v in samples(metrics).items() if n == "bot_datastore_recoveries_total") == 0


def test_datastore_hook_counts_a_real_recovery_from_bak(metrics: Metrics, tmp_path: Path) -> None:
    """A corrupt primary served from .bak by a real DataStore counts as a bak recovery."""
    spec = FileSpec("settings", lambda: {"v": 0}, lambda d: [] if isinstance(d, dict) else ["not a dict"])
    (tmp_path / "settings.json").write_text("{not json")
    (tmp_path / "settings.json.bak").write_text(json.dumps({"v": 1}))
    store = DataStore(tmp_path, [spec], on_event=metrics.datastore_event)
    assert store.load("settings") == {"v": 1}
    assert value(metrics, "bot_datastore_recoveries_total", source="bak") == 1
    assert value(metrics, "bot_datastore_alerts_total") == 0


async def test_watched_retry_policy_reports_retries_denials_and_long_hints(metrics: Metrics) -> None:
    """render() pulls a policy's counters by delta and its budget's tokens."""
    clock = FakeClock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    hint = 0.0

    def classify(exc: BaseException) -> Classification:
        return Classification(Category.UNAVAILABLE, True, hint, "unavailable")

    budget = RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=1.0, clock=clock)
    policy = RetryPolicy(
        "gemini", max_attempts=3, budget=budget, sleep=sleep, classify=classify, hint_cap=5.0
    )
    metrics.watch_retry_policy(policy)

    async def fail() -> None:
        raise ConnectionError("503")

    with pytest.raises(ConnectionError):
        await policy.call(fail)  # one retry on the single token, then the budget says no
    assert value(metrics, "bot_retries_total", dependency="gemini", outcome="retried") == 1
    assert value(metrics, "bot_retries_total", dependency="gemini", outcome="denied_by_budget") == 1
    assert value(metrics, "bot_retry_budget_tokens", dependency="gemini") == 0

    hint = 60.0
    with pytest.raises(RetryHintTooLongError):
        await policy.call(fail)
    got = samples(metrics)
    gemini = {("dependency", "gemini")}
    assert got[("bot_retries_total", frozenset(gemini | {("outcome", "hint_too_long")}))] == 1
    # rendering again adds nothing: counts are deltas, not re-added totals
    assert got[("bot_retries_total", frozenset(gemini | {("outcome", "retried")}))] == 1
    assert sleeps == [0.0]


async def test_watched_mutex_reports_waits_and_timeouts(metrics: Metrics) -> None:
    """A contended acquire counts a wait; one that gives up counts a timeout."""
    mutex = KeyedMutex()
    metrics.watch_mutex(mutex)
    async with mutex.acquire("channel", timeout=1.0):
        with pytest.raises(MutexTimeoutError):
            async with mutex.acquire("channel", timeout=0.01):
                pass
    await asyncio.sleep(0)
    assert value(metrics, "bot_mutex_waits_total") == mutex.waits >= 1
    assert value(metrics, "bot_mutex_timeouts_total") == 1
    metrics.mutex_wait.observe(0.003)
    assert value(metrics, "bot_mutex_wait_seconds_bucket", le="0.005") == 1
    assert value(metrics, "bot_mutex_wait_seconds_bucket", le="0.001") == 0


def test_mode_listener_follows_maintenance(metrics: Metrics) -> None:
    """Hooked into DegradationState, the gauge is 1 in maintenance and 0 otherwise."""
    state = DegradationState(FakeClock())
    state.add_listener(metrics.mode_listener)
    state.set(Mode.MAINTENANCE, "deploy")
    assert value(metrics, "bot_maintenance_mode") == 1
    state.set(Mode.DEGRADED, "gemini down")
    assert value(metrics, "bot_maintenance_mode") == 0


def test_process_metrics_can_be_left_out() -> None:
    """process_metrics=False leaves only the bot's own families."""
    body, _ = Metrics(process_metrics=False).render()
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert names and all(n.startswith("bot_") for n in names)


async def test_service_protocol(metrics: Metrics) -> None:
    """Metrics is a registry service whose start/stop do nothing and health is ok."""
    await metrics.start()
    await metrics.stop()
    assert metrics.name == "metrics" and metrics.depends_on == ()
    assert metrics.health() == {"ok": True}
