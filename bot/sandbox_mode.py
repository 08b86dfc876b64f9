"""``make run`` with no Discord token: the bot against the built-in sandbox emulators."""

from __future__ import annotations

from services.config import Config


def run_sandbox(config: Config) -> int:
    """Placeholder until the sandbox runner and terminal chat are wired to the bot (issue 5 of 7)."""
    print(
        "No DISCORD_TOKEN is set, so this would start the built-in sandbox (emulated Discord and "
        f"Gemini, with a terminal chat). Sandbox mode is not wired to the bot yet; "
        f"`python -m sandbox` starts the emulators on their own. Gemini mode: {config.gemini_mode}."
    )
    return 0
