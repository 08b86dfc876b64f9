"""Every breaker transition is logged with the breaker, both states, the cause and how long the
previous state lasted (resilience.breakers)."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from resilience.breakers import Breaker, BreakerState
from resilience.clock import FakeClock


class Boom(Exception):
    """A dependency failure with an HTTP status, like an SDK error."""

    code = 503


async def fail(breaker: Breaker) -> None:
    async def boom() -> None:
        raise Boom("upstream said no")

    with pytest.raises(Exception):  # noqa: B017 - Boom, or CircuitOpenError once open
        await breaker.call(boom)


async def succeed(breaker: Breaker) -> None:
    async def ok() -> None:
        return None

    await breaker.call(ok)


def transitions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "breaker.transition"]


async def test_open_half_open_closed_are_each_logged_with_cause_and_duration(fake_clock: FakeClock) -> None:
    """Open: the error that caused it and how long it was closed; half-open: after the reset timeout;
    closed: the probe that succeeded and how long it was half-open. The message text is never logged."""
    breaker = Breaker("gemini", fake_clock, fail_max=2, reset_timeout=30.0)
    with capture_logs() as logs:
        fake_clock.advance(100.0)
        await fail(breaker)
        await fail(breaker)
        fake_clock.advance(31.0)
        fake_clock.advance(0.0)
        await succeed(breaker)  # the probe: half-open then closed
    seen = transitions(logs)
    assert [(e["from_state"], e["to_state"]) for e in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    opened, probing, closed = seen
    assert opened["breaker"] == "gemini"
    assert opened["log_level"] == "warning"
    assert opened["cause"] == "2 failures in a row, the last Boom (503)"
    assert opened["previous_state_seconds"] == pytest.approx(100.0)
    assert "upstream said no" not in str(seen)
    assert probing["previous_state_seconds"] == pytest.approx(31.0)
    assert "reset timeout" in probing["cause"]
    assert closed["cause"] == "probe succeeded"
    assert closed["previous_state_seconds"] == pytest.approx(0.0)
    assert breaker.transition_cause == "probe succeeded"


async def test_a_failed_probe_forced_opening_and_reset_are_logged_with_their_cause(
    fake_clock: FakeClock,
) -> None:
    """The cause names a failed probe with its error, an operator's reason, and a reset."""
    breaker = Breaker("discord.send", fake_clock, fail_max=1, reset_timeout=10.0)
    with capture_logs() as logs:
        await fail(breaker)
        fake_clock.advance(10.0)
        await fail(breaker)  # the probe fails: open again
        fake_clock.advance(4.0)
        breaker.reset()
        breaker.force_open(60.0, reason="quota")
    seen = transitions(logs)
    assert [e["to_state"] for e in seen] == ["open", "half_open", "open", "closed", "open"]
    assert seen[2]["cause"] == "probe failed: Boom (503)"
    assert seen[3]["cause"] == "reset"
    assert seen[3]["previous_state_seconds"] == pytest.approx(4.0)
    assert seen[4]["cause"] == "forced open: quota"
    assert breaker.state is BreakerState.OPEN
    assert breaker.transition_cause == "forced open: quota"
