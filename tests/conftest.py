"""Shared fixtures for the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resilience.clock import FakeClock

# A real PostgreSQL for the storage tests (tests/pg.py): one server per session (xdist worker).
from tests.pg import pg_server, pg_url  # noqa: F401


@pytest.fixture
def fake_clock() -> FakeClock:
    """A virtual clock: ``await fake_clock.sleep(x)`` advances time by ``x`` without waiting."""
    return FakeClock()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo any ``configure_logging`` a test did: its stream may be closed when the next test logs."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.configure(**config)
