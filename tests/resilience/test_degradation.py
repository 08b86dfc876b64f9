"""DegradationState: mode, reason, since, maintenance message, listeners."""

from __future__ import annotations

import pytest

from resilience.clock import FakeClock
from resilience.degradation import (
    DEFAULT_MAINTENANCE_MESSAGE,
    DegradationSnapshot,
    DegradationState,
    Mode,
    QueueCaps,
)
from resilience.errors import Category, QueueFullError, ResilienceError, classify


def test_starts_normal_since_construction(fake_clock: FakeClock) -> None:
    """A new state is NORMAL, with no reason or message, since the clock's wall time."""
    state = DegradationState(fake_clock)
    snap = state.snapshot()
    assert snap == DegradationSnapshot(Mode.NORMAL, "", fake_clock.time(), None)
    assert state.mode is Mode.NORMAL


def test_set_changes_mode_reason_and_since(fake_clock: FakeClock) -> None:
    """set() records the new mode, its reason and the time it began."""
    state = DegradationState(fake_clock)
    fake_clock.advance(30)
    snap = state.set(Mode.DEGRADED, reason="gemini breaker open")
    assert snap == state.snapshot()
    assert (snap.mode, snap.reason, snap.since, snap.message) == (
        Mode.DEGRADED,
        "gemini breaker open",
        fake_clock.time(),
        None,
    )
    assert snap.as_dict() == {
        "mode": "degraded",
        "reason": "gemini breaker open",
        "since": fake_clock.time(),
        "message": None,
    }


def test_maintenance_has_a_message_default_or_given(fake_clock: FakeClock) -> None:
    """Maintenance carries the operator's notice, or a default one that promises the message is kept."""
    state = DegradationState(fake_clock)
    assert state.set(Mode.MAINTENANCE, reason="upgrade").message == DEFAULT_MAINTENANCE_MESSAGE
    assert state.set(Mode.MAINTENANCE, "upgrade", "Back at 14:00 UTC").message == "Back at 14:00 UTC"
    assert state.set(Mode.NORMAL).message is None


def test_since_moves_only_when_the_mode_changes(fake_clock: FakeClock) -> None:
    """A new reason in the same mode keeps 'since'; a different mode resets it."""
    state = DegradationState(fake_clock)
    first = state.set(Mode.DEGRADED, "gemini 503")
    fake_clock.advance(10)
    second = state.set(Mode.DEGRADED, "gemini 429")
    assert second.since == first.since
    assert second.reason == "gemini 429"
    fake_clock.advance(10)
    assert state.set(Mode.NORMAL).since == fake_clock.time()


def test_listeners_get_old_and_new_and_no_op_sets_are_silent(fake_clock: FakeClock) -> None:
    """Listeners see each change once; repeating the same state notifies nobody; removal works."""
    state = DegradationState(fake_clock)
    seen: list[tuple[Mode, Mode]] = []

    def listener(old: DegradationSnapshot, new: DegradationSnapshot) -> None:
        seen.append((old.mode, new.mode))

    state.add_listener(listener)
    state.set(Mode.DEGRADED, "x")
    state.set(Mode.DEGRADED, "x")
    state.set(Mode.NORMAL)
    assert seen == [(Mode.NORMAL, Mode.DEGRADED), (Mode.DEGRADED, Mode.NORMAL)]
    state.remove_listener(listener)
    state.remove_listener(listener)
    state.set(Mode.MAINTENANCE)
    assert len(seen) == 2


def test_a_raising_listener_does_not_block_the_change_or_other_listeners(fake_clock: FakeClock) -> None:
    """One broken listener is logged; the mode still changes and later listeners still run."""
    state = DegradationState(fake_clock)
    later: list[Mode] = []

    def broken(old: DegradationSnapshot, new: DegradationSnapshot) -> None:
        raise RuntimeError("listener bug")

    state.add_listener(broken)
    state.add_listener(lambda old, new: later.append(new.mode))
    state.set(Mode.MAINTENANCE, "deploy")
    assert state.mode is Mode.MAINTENANCE
    assert later == [Mode.MAINTENANCE]


def test_mode_accepts_its_string_value(fake_clock: FakeClock) -> None:
    """set('degraded') works like set(Mode.DEGRADED), e.g. from an admin command argument."""
    state = DegradationState(fake_clock)
    assert state.set("degraded", "manual").mode is Mode.DEGRADED  # type: ignore[arg-type]


# -- the queue's caps and its refusal ---------------------------------------------------------


def test_queue_caps_default_to_no_cap_and_refuse_a_cap_below_one() -> None:
    """QueueCaps() caps nothing; a cap of 0, a negative, a float or a bool is a caller's mistake."""
    assert QueueCaps() == QueueCaps(None, None, None)
    assert QueueCaps(max_items=1, max_pending_per_user=5, max_pending_per_guild=50).max_pending_per_user == 5
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pending_per_guild"):
            QueueCaps(max_pending_per_guild=bad)  # type: ignore[arg-type]


def test_a_full_queue_is_classified_as_queue_full_not_retryable_and_not_a_bug() -> None:
    """The refusal has its own category (not INTERNAL, which would apologise with a trace id) and is
    not retryable: queueing the message is exactly what cannot be done."""
    exc = QueueFullError("guild", 50, 123)
    assert isinstance(exc, ResilienceError)
    assert (exc.scope, exc.limit, exc.owner) == ("guild", 50, 123)
    assert "guild 123" in str(exc) and "50" in str(exc)
    verdict = classify(exc)
    assert verdict.category is Category.QUEUE_FULL and not verdict.retryable
    assert verdict.user_message.endswith(".") and "waiting" in verdict.user_message
    assert "the queue" in str(QueueFullError("queue", 10_000))
    with pytest.raises(ValueError, match="scope"):
        QueueFullError("channel", 5)
