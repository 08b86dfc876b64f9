"""Chaos scenarios: the real bot process against the sandbox emulators, under faults.

Scenarios marked ``chaos`` run with ``make chaos`` (``pytest -m chaos``); each family has one
fast, unmarked scenario that runs in ``make test``. The fixtures are the integration ones:
``emulators``, ``bot_env`` and ``spawn_bot`` (see ``tests/integration/conftest.py``).
"""

from tests.integration.conftest import bot_env, emulators, spawn_bot

__all__ = ["bot_env", "emulators", "spawn_bot"]
