"""Shared fixtures for the whole suite."""

from __future__ import annotations

import pytest

from resilience.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    """A virtual clock: ``await fake_clock.sleep(x)`` advances time by ``x`` without waiting."""
    return FakeClock()
