"""``make run`` with no Discord token: the bot against the built-in emulators, with a terminal chat.

``run_sandbox(config)`` starts the Discord and Gemini emulators on loopback
(``sandbox.__main__.open_emulators``), points a copy of the configuration at them (Gemini
stays the real one when ``GEMINI_API_KEY`` is set), runs the bot through
``bot.runner.serve`` exactly as in live mode, and opens the terminal chat
(``sandbox.console``) in the same event loop. The bot's log goes to ``DATA_DIR/sandbox.log``
so that it does not drown the chat. ``:quit``, Ctrl-D and Ctrl-C stop the bot gracefully,
then the emulators, and exit 0. It works line by line when stdin is a pipe, too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import logging.handlers
import signal
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import structlog

from bot.runner import EXIT_CONFIG, EXIT_OK, EXIT_START, serve
from sandbox.__main__ import open_emulators
from sandbox.console import Console, stdin_lines
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import GeminiEmulator
from services.config import Config
from services.datadir import make_private_dir
from services.logging import configure_logging

log = structlog.get_logger("bot.sandbox")

LOG_NAME = "sandbox.log"
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
READY_TIMEOUT = 30.0  # seconds for the bot to start its services and log in to the emulator


def sandbox_config(
    config: Config, discord: DiscordEmulator, gemini: GeminiEmulator, *, data_dir: Path
) -> Config:
    """``config`` pointed at the emulators: Discord always, Gemini only when no ``GEMINI_API_KEY`` is set.

    The emulated admin user becomes a bot admin, and the bot keeps its data in ``data_dir``:
    the emulated world is new on every run, so its queue and history must not mix with the
    live bot's in ``DATA_DIR``.
    """
    changes: dict[str, Any] = {
        "discord_token": discord.token,
        "discord_api_base": discord.api_base,
        "discord_gateway_url": discord.gateway_url,
        "discord_guild_id": discord.guild_id,
        "admin_user_ids": config.admin_user_ids | {discord.users["admin"]},
        "data_dir": data_dir,
    }
    if config.gemini_api_key is None:
        changes |= {"gemini_api_key": gemini.api_key, "gemini_base_url": gemini.base_url}
    return dataclasses.replace(config, **changes)


def banner(config: Config, log_path: Path) -> str:
    """What the sandbox prints first: where the bot runs, how to chat, where the log is, how to go live."""
    if config.gemini_api_key is None:
        gemini = (
            "emulated too, because GEMINI_API_KEY is not set (canned or echoed\n"
            "  answers; nothing leaves this machine)"
        )
        faults = ""
    else:
        gemini = f"the real Gemini ({config.gemini_model}), because GEMINI_API_KEY is set"
        faults = "\n  (:fault gemini ... acts on the emulated Gemini only, which the bot is not using now)"
    rule = "-" * 78
    return "\n".join(
        [
            rule,
            "SANDBOX: no DISCORD_TOKEN is set, so the bot runs against an emulated Discord on",
            "this machine (loopback only; no real server, nobody else can see it).",
            f"  Gemini: {gemini}.",
            "",
            "Chat: type a message and press Enter. You are 'normal' in #general, mentioning the bot.",
            "  :help lists the commands: switch user (:user admin) or channel (:channel dm),",
            "  slash commands (/ask ...), break Discord or Gemini (:fault gemini 503) and :heal." + faults,
            "  :quit, Ctrl-D or Ctrl-C ends the sandbox.",
            f"Bot log: {log_path} (e.g. tail -f it in another terminal).",
            "",
            "Go live: put DISCORD_TOKEN and GEMINI_API_KEY in .env (see .env.example), then run",
            "`make run` again.",
            rule,
        ]
    )


async def chat(
    config: Config,
    *,
    log_path: Path,
    lines: AsyncIterator[str] | None = None,
    out: TextIO = sys.stdout,
    ready_timeout: float = READY_TIMEOUT,
) -> int:
    """Run the emulators, the bot and the terminal chat until the chat or the bot ends; the exit code.

    ``lines`` defaults to stdin (read on a daemon thread). The bot runs in ``serve`` as in
    live mode, so Ctrl-C (SIGINT) and SIGTERM stop it the same way.
    """
    with tempfile.TemporaryDirectory(prefix="gemini-bot-sandbox-") as data_dir:
        async with open_emulators() as (discord, gemini):
            bot_config = sandbox_config(config, discord, gemini, data_dir=Path(data_dir))
            _write(out, banner(config, log_path))
            _write(out, "Starting the bot...")
            log.info("sandbox.start", discord=discord.api_base, gemini=bot_config.gemini_base_url or "real")
            bot = asyncio.create_task(serve(bot_config, token=discord.token), name="sandbox-bot")
            try:
                code = await _converse(discord, gemini, bot, bot_config, lines, out, ready_timeout, log_path)
            finally:
                if not bot.done():  # an error in the chat itself: the bot still closes gracefully
                    _stop(bot)
                    await _settle(bot)
    _write(out, "Sandbox stopped.")
    return code


async def _converse(
    discord: DiscordEmulator,
    gemini: GeminiEmulator,
    bot: asyncio.Task[int],
    config: Config,
    lines: AsyncIterator[str] | None,
    out: TextIO,
    ready_timeout: float,
    log_path: Path,
) -> int:
    """Open the chat once the bot is connected; when either ends, stop the other; the exit code."""
    if not await _wait_connected(discord, bot, ready_timeout):
        if bot.done():  # it failed to start (serve() printed why) or Ctrl-C came first
            return await _settle(bot)
        _write(out, f"The bot did not connect within {ready_timeout:g} s; see {log_path}.")
        _stop(bot)
        await _settle(bot)
        return EXIT_START
    console = Console(discord, gemini, lines if lines is not None else stdin_lines(), out)
    talk = asyncio.create_task(console.run(), name="sandbox-chat")
    await asyncio.wait({bot, talk}, return_when=asyncio.FIRST_COMPLETED)
    if bot.done():  # Ctrl-C / SIGTERM reached serve(), or the bot failed
        talk.cancel()
        _write(out, "")  # a new line after the ^C the terminal echoed
    else:
        await _let_bot_answer(console, bot, config, out)
        log.info("sandbox.quit")
        _write(out, "Stopping the bot...")
        _stop(bot)
    code = await _settle(bot)
    await asyncio.gather(talk, return_exceptions=True)
    console.show_new()  # answers delivered while the bot was closing
    return code


async def _wait_connected(discord: DiscordEmulator, bot: asyncio.Task[int], timeout: float) -> bool:  # noqa: ASYNC109
    """True once the bot holds a gateway session (its services are up by then); False if it ended first."""
    connected = asyncio.create_task(discord.wait_connected(timeout))
    await asyncio.wait({connected, bot}, return_when=asyncio.FIRST_COMPLETED)
    connected.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await connected
    return discord.connected and not bot.done()


async def _let_bot_answer(console: Console, bot: asyncio.Task[int], config: Config, out: TextIO) -> None:
    """Before stopping, wait (bounded; Ctrl-C skips) for replies to the messages typed last.

    Piped input ends right after its last line; without this its answers would never show.
    """
    left = console.unanswered()
    if not left:
        return
    # A reply comes within the processing timeout, even if it is only "queued" or a reason.
    timeout = config.processing_timeout_seconds + 5.0
    _write(out, f"Waiting up to {timeout:g} s for the bot to answer {left} message(s) (Ctrl-C stops now)...")
    left = await console.wait_answered(timeout, give_up=bot.done)
    if left:
        _write(out, f"{left} message(s) still unanswered.")


def _stop(bot: asyncio.Task[int]) -> None:
    """Ask ``serve`` to close the bot the way an operator does: SIGTERM, which it handles gracefully."""
    if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
        # serve() installed its SIGTERM handler on this loop before its first await.
        signal.raise_signal(signal.SIGTERM)
    else:  # serve() could not install signal handlers here; cancelling still runs bot.close()
        bot.cancel()


async def _settle(bot: asyncio.Task[int]) -> int:
    """The bot task's exit code once it has finished closing (0 if it was cancelled)."""
    try:
        return await bot
    except asyncio.CancelledError:
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise
        return EXIT_OK


def _write(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def run_sandbox(config: Config, *, log_max_bytes: int = LOG_MAX_BYTES) -> int:
    """Run the bot against the built-in emulators with a terminal chat; return the exit code.

    The bot's log lines go to ``DATA_DIR/sandbox.log`` (appended) while it runs, and back to
    stderr afterwards. The file rotates at ``log_max_bytes`` (``sandbox.log.1`` ...
    ``sandbox.log.{LOG_BACKUPS}``, the oldest dropped), so a long or noisy session cannot fill
    the disk. Ctrl-C at any moment is a normal way out (exit 0).
    """
    log_path = config.data_dir / LOG_NAME
    try:
        make_private_dir(log_path.parent)
        handler = logging.handlers.RotatingFileHandler(
            log_path, maxBytes=log_max_bytes, backupCount=LOG_BACKUPS, encoding="utf-8"
        )  # flushed after every line, for tail -f
    except OSError as exc:
        print(
            f"error: cannot write the sandbox log {log_path} ({exc.strerror or exc}). "
            "Set DATA_DIR in .env to a writable directory.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    secrets, payloads = config.secrets(), config.log_payloads
    configure_logging(config.log_level, config.log_format, secrets, handler=handler, log_payloads=payloads)
    logging.captureWarnings(True)
    try:
        return asyncio.run(chat(config, log_path=log_path))
    except KeyboardInterrupt:  # Ctrl-C before serve() took over SIGINT, or while stopping
        print("\nSandbox stopped.")
        return EXIT_OK
    finally:
        logging.captureWarnings(False)
        # Back to stderr; replacing the file's handler closes the file.
        configure_logging(config.log_level, config.log_format, secrets, log_payloads=payloads)
