"""``python -m rehearsal run|simulate``: ``make run`` (live with tokens, else the sandbox) and the load run.

``run`` is what ``make run`` calls: with ``DISCORD_TOKEN`` set it is exactly
``python -m bot run``; without, it starts the sandbox (``rehearsal.sandbox_mode``) and says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bot import cli as bot_cli
from rehearsal import simulate
from rehearsal.sandbox_mode import run_sandbox
from services.logging import configure_logging


def run(args: argparse.Namespace) -> int:
    """The bot against Discord with a token, otherwise against the built-in sandbox."""
    config = bot_cli.load_or_report(args)
    if config is None:
        return 1
    if config.discord_token is not None:
        return bot_cli.run(args)
    configure_logging(config.log_level, config.log_format, config.secrets(), log_payloads=config.log_payloads)
    return run_sandbox(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rehearsal",
        description="Run the bot against the built-in sandbox, or load it with injected faults.",
    )
    bot_cli.add_env_file_option(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers.add_parser(
        "run", help="run the bot: live with DISCORD_TOKEN, otherwise the sandbox with a terminal chat"
    ).set_defaults(func=run)
    simulate.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
