"""The error aggregator: grouping by fingerprint, sliding windows, affected users, bounded memory."""

from __future__ import annotations

import gc
import tracemalloc

from resilience.clock import FakeClock
from resilience.errors import CircuitOpenError
from resilience.fingerprints import ErrorAggregator, Fingerprint


def fp(error: str = "ServerError", dependency: str = "gemini", route: str = "message") -> Fingerprint:
    return Fingerprint("unavailable", error, dependency, route)


def test_a_fingerprint_is_category_type_dependency_and_route_never_the_message() -> None:
    """Two failures that differ only in their message are one fingerprint, with a stable short id."""
    a = Fingerprint.of(CircuitOpenError("gemini", 3.0), dependency="gemini", route="message")
    b = Fingerprint.of(CircuitOpenError("gemini", 9.0), dependency="gemini", route="message")
    assert a == b == Fingerprint("circuit_open", "CircuitOpenError", "gemini", "message")
    assert a.id == b.id and len(a.id) == 12
    assert Fingerprint.of(ValueError("x"), dependency=None, route=None) == Fingerprint(
        "internal", "ValueError", "-", "-"
    )


def test_groups_count_first_and_last_seen_users_guilds_and_sample_traces(fake_clock: FakeClock) -> None:
    """Occurrences of one fingerprint are one group: its count, when it began and was last seen,
    the distinct users and guilds it hit, and its newest trace ids (at most ``samples``)."""
    errors = ErrorAggregator(clock=fake_clock, samples=2)
    start = fake_clock.time()
    for i in range(4):
        errors.record(fp(), user=i % 2, guild=1, trace_id=f"t{i}")
        fake_clock.advance(10)
    errors.record(fp("TimeoutError"), user=5)
    first, second = errors.snapshot()
    assert (first["error"], first["count"], first["users"], first["guilds"]) == ("ServerError", 4, 2, 1)
    assert first["first_seen"] == start and first["last_seen"] == start + 30
    assert first["sample_trace_ids"] == ["t2", "t3"]
    assert (second["error"], second["count"], second["users"], second["guilds"]) == ("TimeoutError", 1, 1, 0)
    assert errors.status()["recorded"] == 5


def test_windows_slide_over_5_minutes_an_hour_and_a_day(fake_clock: FakeClock) -> None:
    """Counts leave the 5-minute window after 5 minutes, the hour after an hour, the day after a
    day; the total stays, and a group unseen for the retention is dropped."""
    errors = ErrorAggregator(clock=fake_clock, retention=2 * 86400)
    fake_clock.advance(60 - fake_clock.time() % 60)  # at a minute's start: the buckets are minutes
    for _ in range(3):
        errors.record(fp())
    [row] = errors.snapshot()
    assert row["windows"] == {"5m": 3, "1h": 3, "24h": 3}
    fake_clock.advance(301)
    errors.record(fp())
    assert errors.snapshot()[0]["windows"] == {"5m": 1, "1h": 4, "24h": 4}
    fake_clock.advance(3600)
    assert errors.snapshot()[0]["windows"] == {"5m": 0, "1h": 0, "24h": 4}
    fake_clock.advance(86400)
    [row] = errors.snapshot()
    assert row["windows"] == {"5m": 0, "1h": 0, "24h": 0} and row["count"] == 4
    fake_clock.advance(86400)
    assert errors.snapshot() == [] and len(errors) == 0


def test_the_busiest_group_of_the_last_hour_comes_first_and_limit_cuts(fake_clock: FakeClock) -> None:
    errors = ErrorAggregator(clock=fake_clock)
    errors.record(fp("A"))
    fake_clock.advance(1)
    for _ in range(3):
        errors.record(fp("B"))
    fake_clock.advance(1)
    errors.record(fp("C"))
    assert [r["error"] for r in errors.snapshot()] == ["B", "C", "A"]
    assert [r["error"] for r in errors.snapshot(limit=1)] == ["B"]


def test_memory_is_bounded_with_100000_distinct_errors(fake_clock: FakeClock) -> None:
    """100,000 distinct fingerprints, each from another user, guild and trace: at most
    ``max_groups`` are kept (the least recently seen go first and are counted), each group's
    users and guilds are capped, and the memory held after 100,000 is what it was after 5,000."""
    errors = ErrorAggregator(clock=fake_clock, max_groups=256, max_ids=50, samples=5)

    def flood(start: int, stop: int) -> None:
        for i in range(start, stop):
            errors.record(
                Fingerprint("internal", f"Error{i}", f"dep{i % 7}", f"route{i % 3}"),
                user=i,
                guild=i + 1,
                trace_id=f"{i:012x}",
            )
            fake_clock.advance(0.01)

    for i in range(200):  # one busy group, hit by many users: its id sets are capped
        errors.record(fp(), user=i, guild=i)
    tracemalloc.start()
    try:
        flood(0, 5_000)
        gc.collect()
        after_5k = tracemalloc.get_traced_memory()[0]
        flood(5_000, 100_000)
        gc.collect()
        after_100k, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(errors) == 256
    # Every distinct group but the newest 256 was forgotten, the busy one among them.
    assert errors.status() == {
        "recorded": 100_200, "groups": 256, "max_groups": 256, "evicted": 100_001 - 256, "retention": 86400.0
    }
    assert after_100k - after_5k < 64 * 1024, (after_5k, after_100k)
    assert peak - after_5k < 256 * 1024
    assert all(r["users"] <= 50 for r in errors.snapshot(limit=1000))


def test_a_busy_groups_users_are_capped_and_say_so(fake_clock: FakeClock) -> None:
    errors = ErrorAggregator(clock=fake_clock, max_ids=50)
    for i in range(200):
        errors.record(fp(), user=i, guild=i % 60)
    [row] = errors.snapshot()
    assert (row["users"], row["users_capped"], row["guilds"], row["guilds_capped"]) == (50, True, 50, True)
    assert row["count"] == 200
