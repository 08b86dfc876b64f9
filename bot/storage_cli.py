"""``python -m bot storage migrate-sqlite-to-postgres [--dry-run] [--sqlite FILE]``: move a
single-process bot's data to PostgreSQL.

Run it once, with the bot stopped, after setting ``DATABASE_URL``: it copies ``DATA_DIR/bot.sqlite3``
(the queue, history, processed ids, token usage, availability) and the JSON documents of ``DATA_DIR``
(maintenance, guild settings, admins, breaker overrides) into the database, in one transaction
(``services.pg_import``). Running it again copies nothing twice; ``--dry-run`` reports what it
would copy and writes nothing. It holds ``DATA_DIR``'s lock while it runs, so a running bot makes it
refuse (exit 3). Exit 0 when copied (or, dry, when it could be), 1 when something stops it (no
``DATABASE_URL``, no SQLite file, PostgreSQL unreachable or of a newer schema), 3 when DATA_DIR is
in use.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

from services.config import Config, ConfigError, load_config
from services.datadir import DataDirLock, DataDirLockedError, describe_holder
from services.logging import configure_logging
from services.pg_import import ImportReport, import_sqlite
from services.storage import StorageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_IN_USE = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``storage`` subcommand and its ``migrate-sqlite-to-postgres`` action."""
    parser = subparsers.add_parser(
        "storage",
        help="move the SQLite store and JSON files to PostgreSQL (DATABASE_URL)",
        description="Storage tools. Run them while the bot is stopped.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    migrate = actions.add_parser(
        "migrate-sqlite-to-postgres",
        help="copy DATA_DIR's SQLite store and JSON files into DATABASE_URL (idempotent)",
        description="Copy the queue, history, processed ids, token usage and availability of the SQLite "
        "store, and the JSON documents beside it, into the PostgreSQL database of DATABASE_URL, in one "
        "transaction. Rows copied before are never copied again.",
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="report what would be copied; write nothing"
    )
    migrate.add_argument(
        "--sqlite",
        type=Path,
        default=None,
        metavar="FILE",
        help="the SQLite file (default: DATA_DIR/bot.sqlite3)",
    )
    migrate.set_defaults(func=migrate_sqlite_to_postgres)


def migrate_sqlite_to_postgres(args: argparse.Namespace) -> int:
    """Copy, report, return the exit code (see the module docstring)."""
    try:
        config = load_config(env_file=args.env_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    if not config.database_url:
        print(
            "DATABASE_URL is not set: set it to the PostgreSQL database to copy into "
            "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    sqlite_path: Path = args.sqlite or config.data_dir / "bot.sqlite3"
    if not sqlite_path.is_file():
        print(f"{sqlite_path} does not exist: no SQLite store to copy (see --sqlite).", file=sys.stderr)
        return EXIT_FAILED
    configure_logging(config.log_level, config.log_format, config.secrets())
    lock = DataDirLock(config.data_dir)
    try:
        lock.acquire()
    except DataDirLockedError as exc:
        print(
            f"DATA_DIR {config.data_dir} is in use by {describe_holder(exc.pid)}: stop the bot first, so "
            "that nothing changes the SQLite store while it is copied.",
            file=sys.stderr,
        )
        return EXIT_IN_USE
    try:
        report = asyncio.run(_copy(config, sqlite_path, args.dry_run))
    except StorageError as exc:  # unreachable, refused, a schema of a newer bot
        print(f"nothing was copied: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:
        print(f"nothing was copied: {sqlite_path} cannot be read ({exc})", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lock.release()
    _print(report)
    return EXIT_OK


async def _copy(config: Config, sqlite_path: Path, dry_run: bool) -> ImportReport:
    assert config.database_url is not None
    return await import_sqlite(
        sqlite_path, config.database_url, data_dir=config.data_dir, dry_run=dry_run, now=time.time()
    )


def _print(report: ImportReport) -> None:
    verb = "would copy" if report.dry_run else "copied"
    print(f"{report.source} -> PostgreSQL at {report.target}")
    for table, count in report.tables.items():
        print(f"  {table:<16} {verb} {count.copied:>7}, already there {count.already:>7}")
    if report.dry_run:
        print("Dry run: nothing was written. Run it again without --dry-run to copy.")
    elif report.copied:
        print(f"Copied {report.copied} rows in one transaction. Start the bot with DATABASE_URL set.")
    else:
        print("Nothing new to copy: everything was copied before.")
