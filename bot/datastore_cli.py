"""``python -m bot datastore {validate,recover,backups} [NAME] [--data-dir DIR]``: the offline DataStore tool.

For an operator while the bot is stopped: it takes the data directory's lock for as long as
it runs, and refuses (exit 3, one sentence naming the holder's pid) while a running bot, or
another datastore command, holds it. The running bot has the same operations online (the
HTTP API, ``/admin datastore``). Exit codes tell the truth: validate is 0 when every file is
valid and 1 when any is not; recover is 0 when every file came back from its file, ``.bak``
or a backup and 2 when only the defaults were left; an unknown NAME or an unusable data
directory is 2; the directory in use is 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import structlog
from dotenv import dotenv_values

from services.datadir import DataDirLock, DataDirLockedError, describe_holder
from services.datastore import DEFAULT_FILES, DataStore, UnknownFileError

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_DEFAULTS_OR_USAGE = 2
EXIT_IN_USE = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``datastore`` subcommand; its ``func(args)`` returns the exit code."""
    parser = subparsers.add_parser(
        "datastore",
        help="check, recover or list backups of the JSON DataStore (run while the bot is stopped)",
        description="Offline tool for the JSON DataStore. Run it while the bot is stopped: it "
        "refuses (exit 3) while a bot holds the data directory.",
    )
    parser.add_argument(
        "action",
        choices=["validate", "recover", "backups"],
        help="validate: check files (exit 1 if any invalid); recover: reload from the best valid "
        "source and write it back (exit 2 if only defaults were left); backups: list backups",
    )
    parser.add_argument(
        "name",
        nargs="?",
        default=None,
        metavar="NAME",
        help=f"one of {', '.join(DEFAULT_FILES)} (default: all)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="data directory (default: $DATA_DIR, then DATA_DIR in the env file, then ./data)",
    )
    parser.set_defaults(func=run)


def resolve_data_dir(args: argparse.Namespace) -> Path:
    """``--data-dir``, else ``DATA_DIR`` from the environment, else from the env file, else ``data``."""
    if args.data_dir is not None:
        return Path(args.data_dir)
    if os.environ.get("DATA_DIR"):
        return Path(os.environ["DATA_DIR"])
    env_file = Path(getattr(args, "env_file", None) or ".env")
    if env_file.is_file():
        value = dotenv_values(env_file).get("DATA_DIR")
        if value:
            return Path(value)
    return Path("data")


def run(args: argparse.Namespace) -> int:
    """Run one action and return its exit code."""
    # Log lines go to stderr so that stdout is the report.
    logger = structlog.wrap_logger(structlog.PrintLogger(sys.stderr))
    store = DataStore(resolve_data_dir(args), logger=logger)
    if args.name is not None and args.name not in store.specs:
        print(f"unknown file {args.name!r}; valid names: {', '.join(store.names())}", file=sys.stderr)
        return EXIT_DEFAULTS_OR_USAGE
    names = [args.name] if args.name is not None else store.names()
    lock = DataDirLock(store.data_dir)
    # Reading a directory that does not exist needs no lock (and must not create it).
    if args.action == "recover" or store.data_dir.exists():
        try:
            lock.acquire()
        except DataDirLockedError as exc:
            print(
                f"DATA_DIR {store.data_dir} is in use by {describe_holder(exc.pid)}, a running bot "
                "or another datastore command, so it was not touched: recover online (the HTTP API, "
                "/admin datastore, or scripts/datastore-recovery.sh without --offline), or stop that "
                "process first.",
                file=sys.stderr,
            )
            return EXIT_IN_USE
        except OSError as exc:
            print(
                f"cannot use DATA_DIR {store.data_dir} ({exc.strerror or exc}): point --data-dir or "
                "DATA_DIR at a directory you can write to.",
                file=sys.stderr,
            )
            return EXIT_DEFAULTS_OR_USAGE
    print(f"DataStore at {store.data_dir.resolve()}")
    try:
        if args.action == "validate":
            return _validate(store, names)
        if args.action == "recover":
            return _recover(store, names)
        return _backups(store, names)
    except UnknownFileError as exc:  # pragma: no cover - names were checked above
        print(exc, file=sys.stderr)
        return EXIT_DEFAULTS_OR_USAGE
    finally:
        lock.release()


def _validate(store: DataStore, names: list[str]) -> int:
    bad = 0
    for name in names:
        (report,) = store.validate(name)
        backups = store.list_backups(name)
        valid_backups = sum(b.valid for b in backups)
        bak = "present" if store.bak_path(name).exists() else "absent"
        if report.ok and not report.path.exists():
            verdict = "OK (not created yet: defaults)"
        else:
            verdict = "OK" if report.ok else "INVALID"
        print(f"  {name:<16} {verdict}    .bak {bak}, backups {valid_backups} valid of {len(backups)}")
        for problem in report.problems:
            print(f"      - {problem}")
        bad += not report.ok
    if bad:
        print(f"{bad} file(s) invalid: run `python -m bot datastore recover` to restore from backups.")
        return EXIT_INVALID
    print("All files valid.")
    return EXIT_OK


def _recover(store: DataStore, names: list[str]) -> int:
    only_defaults = 0
    for name in names:
        report = store.recover(name)
        alert = "    ALERT: nothing valid was left" if report.alert else ""
        print(f"  {name:<16} served from {report.source}{alert}")
        for problem in report.problems:
            print(f"      rejected {problem}")
        for path in report.quarantined:
            print(f"      moved aside to {path}")
        only_defaults += report.from_defaults
    if only_defaults:
        print(f"{only_defaults} file(s) hold only the defaults: no valid file, .bak or backup was found.")
        return EXIT_DEFAULTS_OR_USAGE
    print("All files hold a valid recovered state.")
    return EXIT_OK


def _backups(store: DataStore, names: list[str]) -> int:
    for name in names:
        infos = store.list_backups(name)
        print(f"  {name}: {len(infos)} backup(s)")
        for info in infos:
            when = datetime.fromtimestamp(info.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
            print(f"      {when}  {info.size:>7} B  {'valid' if info.valid else 'INVALID'}  {info.path.name}")
    return EXIT_OK
