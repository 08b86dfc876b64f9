"""The command line: ``python -m bot check|run|datastore ...|storage ...``.

The sandbox and the load run live above the bot, in ``rehearsal`` (``python -m rehearsal``).

Every subcommand sets ``func(args) -> int`` with ``set_defaults``; ``main()`` parses and
calls it, and returns its exit code. A bad configuration prints the problem list, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from bot import storage_cli
from bot.app import SANDBOX_GEMINI_KEY
from bot.runner import serve
from services.config import Config, ConfigError, load_config
from services.gemini import MODEL_CHECK_TIMEOUT, check_configured_models
from services.logging import configure_logging
from services.pg_storage import DatabaseUnavailableError, describe_url, migration_files, probe


def load_or_report(args: argparse.Namespace) -> Config | None:
    """Load the configuration, or print every problem to stderr and return ``None``."""
    try:
        return load_config(env_file=args.env_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print("See .env.example for every setting and its default.", file=sys.stderr)
        return None


def check(args: argparse.Namespace) -> int:
    """Print the effective configuration (secrets redacted) and the modes, and ask Gemini whether
    it has the configured models; 1 if the configuration is invalid or a model is missing."""
    config = load_or_report(args)
    if config is None:
        return 1
    print(f"Discord: {config.discord_mode}    Gemini: {config.gemini_mode}")
    settings = config.redacted()
    width = max(len(name) for name in settings)
    for name, value in settings.items():
        print(f"  {name.ljust(width)} = {value}")
    for warning in config.warnings:
        print(f"warning: {warning}")
    models_ok = check_models(config)
    database_ok = check_database(config)
    if not (models_ok and database_ok):
        print("Configuration has problems: see the errors above.", file=sys.stderr)
        return 1
    print("Configuration OK.")
    return 0


def check_database(config: Config) -> bool:
    """With ``DATABASE_URL``: whether PostgreSQL answers and its schema is one this build can use;
    False only for a schema of a newer bot. Not reaching it is a warning (it may be down now)."""
    if not config.database_url:
        print("Storage: SQLite in DATA_DIR")
        return True
    where = describe_url(config.database_url)
    supported = len(migration_files())
    try:
        found = asyncio.run(probe(config.database_url))
    except DatabaseUnavailableError as exc:
        print(f"warning: DATABASE_URL: {exc}")
        return True
    if found is None:
        print(f"Storage: PostgreSQL at {where}, empty: the bot creates its tables (schema {supported})")
    elif found > supported:
        print(
            f"error: DATABASE_URL: {where} has schema version {found}, this build supports up to "
            f"{supported}; upgrade the bot or restore an older database",
            file=sys.stderr,
        )
        return False
    else:
        note = "" if found == supported else f" (migrated to {supported} at the next start)"
        print(f"Storage: PostgreSQL at {where}, schema version {found}{note}")
    return True


def check_models(config: Config) -> bool:
    """One ``models.get`` per configured model; False if Gemini lacks one. Not being able to ask
    (no network, a timeout, an outage) is a warning, never "missing"."""
    models = [config.gemini_model, *config.gemini_fallback_models]
    if config.gemini_api_key is None and config.gemini_base_url is None:
        print("Gemini models: not checked (sandbox mode: the emulator serves them)")
        return True
    results = asyncio.run(
        check_configured_models(
            config.gemini_api_key or SANDBOX_GEMINI_KEY,
            config.gemini_base_url,
            models,
            within=MODEL_CHECK_TIMEOUT,
        )
    )
    ok = True
    for result in results:
        setting = "GEMINI_MODEL" if result.model == config.gemini_model else "GEMINI_FALLBACK_MODELS"
        if result.status == "ok":
            print(f"Gemini model {result.model}: found")
        elif result.status == "missing":
            ok = False
            print(f"error: {setting}: {result.detail}", file=sys.stderr)
        else:
            print(f"warning: {setting}: {result.model}: {result.detail}")
    return ok


def run(args: argparse.Namespace) -> int:
    """Start the bot against Discord (``DISCORD_TOKEN``); without a token, say how to use the sandbox."""
    config = load_or_report(args)
    if config is None:
        return 1
    if config.discord_token is None:
        print(
            "error: DISCORD_TOKEN is not set. Put the bot token in .env (see .env.example), or try "
            "the bot without tokens: `make run` (python -m rehearsal run) starts it against the "
            "built-in sandbox.",
            file=sys.stderr,
        )
        return 1
    if config.gemini_api_key is None and config.gemini_base_url is None:
        print(
            "error: DISCORD_TOKEN is set but GEMINI_API_KEY is not. Get a key at "
            "https://aistudio.google.com/apikey and put it in .env "
            "(or unset DISCORD_TOKEN to use the sandbox).",
            file=sys.stderr,
        )
        return 1
    configure_logging(config.log_level, config.log_format, config.secrets(), log_payloads=config.log_payloads)
    return asyncio.run(serve(config, token=config.discord_token, banner=True))


def _register_datastore(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``datastore`` from ``bot/datastore_cli.py`` when that module exists."""
    try:
        datastore_cli = importlib.import_module("bot.datastore_cli")
    except ModuleNotFoundError as exc:
        # Only the module's absence is tolerated; an import error inside it must surface.
        if exc.name != "bot.datastore_cli":
            raise
        return
    datastore_cli.register(subparsers)


def add_env_file_option(parser: argparse.ArgumentParser) -> None:
    """``--env-file``, which ``load_or_report`` reads (``python -m bot`` and ``python -m rehearsal``)."""
    parser.add_argument(
        "--env-file",
        type=Path,
        default=Path(".env"),
        help="file of settings read before the environment; the environment wins (default: .env)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="python -m bot", description="A Discord bot that chats through Google Gemini."
    )
    add_env_file_option(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers.add_parser("check", help="validate and show the configuration").set_defaults(func=check)
    subparsers.add_parser("run", help="run the bot").set_defaults(func=run)
    _register_datastore(subparsers)
    storage_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the chosen subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
