"""Behaviour of the asyncio circuit breaker (resilience.breakers) on a FakeClock."""

from __future__ import annotations

import asyncio

import pybreaker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.breakers import (
    Breaker,
    BreakerBoard,
    BreakerSnapshot,
    BreakerState,
    Lease,
    UnknownBreakerError,
)
from resilience.clock import FakeClock
from resilience.errors import CallTimeoutError, CircuitOpenError


class Boom(Exception):
    """A dependency failure."""


class BusinessError(Exception):
    """An error about the request, not the dependency (excluded from the breaker)."""


class Dependency:
    """A fake dependency that counts calls and fails, succeeds, or waits as told."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_with: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return value


async def fail_times(breaker: Breaker, dep: Dependency, n: int) -> None:
    """Make ``n`` calls that fail with Boom."""
    dep.fail_with = Boom("down")
    for _ in range(n):
        with pytest.raises(Boom):
            await breaker.call(dep)
    dep.fail_with = None


@pytest.fixture
def breaker(fake_clock: FakeClock) -> Breaker:
    """A breaker that opens after 3 failures and probes after 30 s, excluding BusinessError."""
    return Breaker("gemini", fake_clock, fail_max=3, reset_timeout=30.0, exclude=[BusinessError])


async def test_opens_after_fail_max_failures_and_rejects_fast_with_remaining_time(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 2)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 2
    await fail_times(breaker, dep, 1)
    assert breaker.state is BreakerState.OPEN

    fake_clock.advance(10.0)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(dep)
    assert dep.calls == 3, "a rejected call must not reach the dependency"
    assert info.value.name == "gemini"
    assert info.value.remaining == pytest.approx(20.0)
    assert breaker.remaining_open() == pytest.approx(20.0)


async def test_success_in_closed_resets_the_failure_count(breaker: Breaker) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 2)
    assert await breaker.call(dep, "hi") == "hi"
    assert breaker.failures == 0
    await fail_times(breaker, dep, 2)
    assert breaker.state is BreakerState.CLOSED


async def test_half_open_admits_exactly_one_of_50_concurrent_callers(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 3)
    fake_clock.advance(30.0)
    dep.calls = 0
    dep.gate = asyncio.Event()

    tasks = [asyncio.create_task(breaker.call(dep)) for _ in range(50)]
    await asyncio.wait_for(dep.entered.wait(), 1.0)
    await asyncio.sleep(0)  # let every other task reach admission
    rejected = [t for t in tasks if t.done()]
    assert breaker.state is BreakerState.HALF_OPEN
    assert dep.calls == 1
    assert len(rejected) == 49
    for task in rejected:
        exc = task.exception()
        assert isinstance(exc, CircuitOpenError)
        assert exc.remaining == 0.0

    dep.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
    assert results.count("ok") == 1
    assert breaker.state is BreakerState.CLOSED


async def test_cancelled_probe_leaves_half_open_and_a_new_probe_is_admitted(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 3)
    fake_clock.advance(30.0)
    dep.gate = asyncio.Event()

    probe = asyncio.create_task(breaker.call(dep))
    await asyncio.wait_for(dep.entered.wait(), 1.0)
    with pytest.raises(CircuitOpenError):
        await asyncio.wait_for(breaker.call(dep), 1.0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state is BreakerState.HALF_OPEN, "cancellation is no outcome"

    dep.gate = None
    assert await breaker.call(dep, "second probe") == "second probe"
    assert breaker.state is BreakerState.CLOSED


async def test_timeout_inside_the_breaker_counts_as_a_failure_and_opens_it(fake_clock: FakeClock) -> None:
    breaker = Breaker("discord.send", fake_clock, fail_max=2, reset_timeout=5.0)
    dep = Dependency()
    dep.gate = asyncio.Event()  # never set: the call hangs
    for _ in range(2):
        with pytest.raises(CallTimeoutError) as info:
            await asyncio.wait_for(breaker.call(dep, timeout=0.01), 1.0)
        assert info.value.operation == "discord.send"
        assert info.value.timeout == 0.01
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot().last_error == "CallTimeoutError"


async def test_callee_own_timeout_error_is_a_failure_and_passes_through(breaker: Breaker) -> None:
    dep = Dependency()
    dep.fail_with = TimeoutError("sdk read timeout")
    with pytest.raises(TimeoutError) as info:
        await breaker.call(dep, timeout=5.0)
    assert not isinstance(info.value, CallTimeoutError)
    assert breaker.failures == 1


async def test_excluded_error_does_not_count_as_failure_in_closed(breaker: Breaker) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 2)
    dep.fail_with = BusinessError("bad prompt")
    for _ in range(5):
        with pytest.raises(BusinessError):
            await breaker.call(dep)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 2, "an excluded error counts neither as failure nor as success"


async def test_excluded_error_does_not_close_half_open_and_frees_the_probe(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 3)
    fake_clock.advance(30.0)
    dep.fail_with = BusinessError("bad prompt")
    with pytest.raises(BusinessError):
        await breaker.call(dep)
    assert breaker.state is BreakerState.HALF_OPEN
    dep.fail_with = None
    assert await breaker.call(dep) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_exclusion_predicate_marks_business_errors(fake_clock: FakeClock) -> None:
    breaker = Breaker("x", fake_clock, fail_max=1, exclude=[lambda e: getattr(e, "code", 0) == 400])
    err = Boom("bad request")
    err.code = 400  # type: ignore[attr-defined]
    with pytest.raises(Boom):
        await breaker.call(_failing(err))
    assert breaker.state is BreakerState.CLOSED


def _failing(exc: BaseException) -> Dependency:
    dep = Dependency()
    dep.fail_with = exc
    return dep


async def test_success_in_half_open_closes_it(breaker: Breaker, fake_clock: FakeClock) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 3)
    fake_clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        await breaker.call(dep)
    fake_clock.advance(0.1)
    assert await breaker.call(dep) == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 0


async def test_failure_in_half_open_reopens_for_a_full_reset_timeout(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 3)
    fake_clock.advance(31.0)
    await fail_times(breaker, dep, 1)
    assert breaker.state is BreakerState.OPEN
    assert breaker.remaining_open() == pytest.approx(30.0)


async def test_success_threshold_needs_that_many_probe_successes(fake_clock: FakeClock) -> None:
    breaker = Breaker("storage", fake_clock, fail_max=1, reset_timeout=1.0, success_threshold=2)
    dep = Dependency()
    await fail_times(breaker, dep, 1)
    fake_clock.advance(1.0)
    await breaker.call(dep)
    assert breaker.state is BreakerState.HALF_OPEN
    await breaker.call(dep)
    assert breaker.state is BreakerState.CLOSED


async def test_late_success_from_a_call_admitted_while_closed_does_not_close_the_breaker(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    slow = Dependency()
    slow.gate = asyncio.Event()
    straggler = asyncio.create_task(breaker.call(slow))
    await asyncio.wait_for(slow.entered.wait(), 1.0)
    await fail_times(breaker, Dependency(), 3)
    fake_clock.advance(30.0)
    lease = breaker.admit()  # the half-open probe, still out
    slow.gate.set()
    assert await asyncio.wait_for(straggler, 1.0) == "ok"
    assert breaker.state is BreakerState.HALF_OPEN
    lease.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_a_stale_probe_cannot_free_or_settle_the_next_probe(breaker: Breaker, fake_clock: FakeClock) -> None:
    """A probe that outlived a force_open reports into the void: the new probe keeps its slot."""
    breaker.force_open(1.0)
    fake_clock.advance(1.0)
    stale = breaker.admit()
    breaker.force_open(1.0, reason="operator")
    fake_clock.advance(1.0)
    current = breaker.admit()
    stale.release()
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    current.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_a_stale_probe_failure_does_not_reopen(breaker: Breaker, fake_clock: FakeClock) -> None:
    breaker.force_open(1.0)
    fake_clock.advance(1.0)
    stale = breaker.admit()
    breaker.reset()
    stale.record_failure(Boom("late"))
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 0


async def test_lease_context_manager_records_outcomes(breaker: Breaker, fake_clock: FakeClock) -> None:
    for _ in range(3):
        with pytest.raises(Boom), breaker.admit():
            raise Boom("down")
    assert breaker.state is BreakerState.OPEN
    fake_clock.advance(30.0)
    with breaker.admit():
        with pytest.raises(CircuitOpenError):
            breaker.admit()
    assert breaker.state is BreakerState.CLOSED


def test_admission_is_synchronous_and_rejects_while_the_probe_lease_is_held(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    breaker.force_open(5.0)
    fake_clock.advance(5.0)
    lease = breaker.admit()
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    lease.release()
    lease.record_failure(Boom("ignored: already reported"))
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.admit().record_success()
    assert breaker.state is BreakerState.CLOSED


def test_would_admit_predicts_admission_without_taking_the_probe(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    assert breaker.would_admit()
    breaker.force_open(5.0)
    assert not breaker.would_admit()
    fake_clock.advance(5.0)
    assert breaker.would_admit()
    assert breaker.would_admit(), "asking must not take the probe slot"
    lease = breaker.admit()
    assert not breaker.would_admit()
    lease.release()
    assert breaker.would_admit()


async def test_force_open_holds_open_for_the_duration_with_reason(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    breaker.force_open(3600.0, reason="daily quota")
    snap = breaker.snapshot()
    assert snap.state is BreakerState.OPEN
    assert snap.forced_reason == "daily quota"
    assert snap.remaining == pytest.approx(3600.0)
    fake_clock.advance(3599.0)
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    assert info.value.remaining == pytest.approx(1.0)
    fake_clock.advance(1.0)
    breaker.admit().record_success()
    assert breaker.snapshot().forced_reason is None
    assert breaker.state is BreakerState.CLOSED


def test_force_open_defaults_to_the_reset_timeout(breaker: Breaker) -> None:
    breaker.force_open()
    assert breaker.remaining_open() == pytest.approx(30.0)


async def test_reset_closes_and_clears_counters(breaker: Breaker) -> None:
    dep = Dependency()
    await fail_times(breaker, dep, 3)
    breaker.reset()
    snap = breaker.snapshot()
    assert (snap.state, snap.failures, snap.remaining, snap.last_error) == (BreakerState.CLOSED, 0, 0.0, None)
    await fail_times(breaker, dep, 2)
    assert breaker.state is BreakerState.CLOSED


async def test_snapshot_reports_transition_time_and_error_without_message(
    breaker: Breaker, fake_clock: FakeClock
) -> None:
    class ApiError(Exception):
        code = 503

    dep = Dependency()
    dep.fail_with = ApiError("https://x.example/v1?key=SECRET")
    fake_clock.advance(7.0)
    for _ in range(3):
        with pytest.raises(ApiError):
            await breaker.call(dep)
    snap = breaker.snapshot()
    assert isinstance(snap, BreakerSnapshot)
    assert snap.since == fake_clock.time()
    assert snap.failures == 3
    assert snap.last_error == "ApiError (503)"
    assert "SECRET" not in repr(snap)


def test_board_lookup_error_lists_valid_names(fake_clock: FakeClock) -> None:
    board = BreakerBoard(fake_clock)
    board.add("gemini")
    board.add("discord.send")
    with pytest.raises(KeyError) as info:
        board["gemni"]
    assert isinstance(info.value, UnknownBreakerError)
    assert "gemini" in str(info.value) and "discord.send" in str(info.value)
    with pytest.raises(UnknownBreakerError):
        board.get("storage")
    assert board.names() == ["gemini", "discord.send"]
    with pytest.raises(ValueError):
        board.add("gemini")


def test_board_applies_defaults_and_overrides(fake_clock: FakeClock) -> None:
    board = BreakerBoard(fake_clock, fail_max=2, reset_timeout=10.0)
    default = board.add("storage")
    custom = board.add("gemini", fail_max=4, reset_timeout=60.0)
    assert (default.fail_max, default.reset_timeout) == (2, 10.0)
    assert (custom.fail_max, custom.reset_timeout) == (4, 60.0)
    assert board["gemini"] is custom


async def test_board_listeners_fire_once_per_transition(fake_clock: FakeClock) -> None:
    board = BreakerBoard(fake_clock, fail_max=1, reset_timeout=1.0)
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    early = board.add("gemini")
    board.add_listener(lambda name, old, new: seen.append((name, old, new)))
    late = board.add("discord.send")

    await fail_times(early, Dependency(), 1)
    early.force_open(5.0, reason="again")  # already open: no transition
    fake_clock.advance(5.0)
    await early.call(Dependency())
    late.force_open()
    board.reset_all()
    board.reset_all()  # already closed: no transition

    closed, opened, half = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
    assert seen == [
        ("gemini", closed, opened),
        ("gemini", opened, half),
        ("gemini", half, closed),
        ("discord.send", closed, opened),
        ("discord.send", opened, closed),
    ]
    assert [s.state for s in board.snapshot()] == [closed, closed]


async def test_a_failing_listener_does_not_break_the_call(fake_clock: FakeClock) -> None:
    breaker = Breaker("x", fake_clock, fail_max=1)

    def broken(name: str, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics down")

    breaker.add_listener(broken)
    await fail_times(breaker, Dependency(), 1)
    assert breaker.state is BreakerState.OPEN


async def test_pybreaker_listeners_hear_transitions(breaker: Breaker, fake_clock: FakeClock) -> None:
    class Recorder(pybreaker.CircuitBreakerListener):
        def __init__(self) -> None:
            self.changes: list[tuple[str, str]] = []

        def state_change(self, cb, old_state, new_state):  # type: ignore[no-untyped-def]
            self.changes.append((old_state.name, new_state.name))

    recorder = Recorder()
    breaker.circuit.add_listener(recorder)
    await fail_times(breaker, Dependency(), 3)
    assert recorder.changes == [("closed", "open")]
    assert breaker.circuit.current_state == pybreaker.STATE_OPEN


class _Harness:
    """Random interleavings of admissions, outcomes and clock moves against one breaker."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.breaker = Breaker("prop", self.clock, fail_max=2, reset_timeout=2.0, exclude=[BusinessError])
        self.leases: list[tuple[Lease, BreakerState, int]] = []  # (lease, state at admission, transitions)
        self.transitions = 0
        self.breaker.add_listener(self._count)

    def _count(self, name: str, old: BreakerState, new: BreakerState) -> None:
        assert old is not new
        self.transitions += 1


# Weighted towards admissions and failures so that half-open is reached often.
OPS = ["admit"] * 4 + ["failure"] * 2 + ["advance"] * 2 + ["success", "excluded", "release", "force", "reset"]
PYBREAKER_STATES = {"closed": "closed", "open": "open", "half-open": "half_open"}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(OPS),
            st.integers(min_value=0, max_value=50),
        ),
        min_size=5,
        max_size=60,
    )
)
@settings(max_examples=200, deadline=None)
def test_random_interleavings_keep_one_probe_and_mirror_pybreaker(ops: list[tuple[str, int]]) -> None:
    """Whatever happens, half-open has at most one unsettled probe and the state matches pybreaker's."""
    h = _Harness()
    breaker = h.breaker
    for op, arg in ops:
        if op == "admit":
            try:
                lease = breaker.admit()
            except CircuitOpenError as exc:
                assert breaker.state is not BreakerState.CLOSED
                assert exc.remaining >= 0.0
            else:
                h.leases.append((lease, breaker.state, h.transitions))
        elif op in ("success", "failure", "excluded", "release") and h.leases:
            settled = h.leases.pop(arg % len(h.leases))[0]
            if op == "success":
                settled.record_success()
            elif op == "failure":
                settled.record_failure(Boom("down"))
            elif op == "excluded":
                settled.record_failure(BusinessError("bad"))
            else:
                settled.release()
        elif op == "advance":
            h.clock.advance(arg % 4 * 1.0)  # half of the moves outlast the 2 s reset timeout
        elif op == "force":
            breaker.force_open(float(arg))
        elif op == "reset":
            breaker.reset()

        assert breaker.state == PYBREAKER_STATES[breaker.circuit.current_state]
        probes_out = [
            1 for _, state, seen in h.leases if state is BreakerState.HALF_OPEN and seen == h.transitions
        ]
        assert len(probes_out) <= 1
        if breaker.state is BreakerState.CLOSED:
            assert breaker.failures < breaker.fail_max
        else:
            assert breaker.remaining_open() <= 50.0
    assert h.transitions >= 0
