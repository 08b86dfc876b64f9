"""``python -m bot run``: build the application, connect to Discord, shut down cleanly.

Every way start-up can fail ends in one clear sentence and a non-zero exit code, never a
traceback: a wrong token, a missing privileged intent, an unreachable gateway, a service
that does not start.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import discord
import structlog

from bot.app import build_application, point_discord_at
from bot.client import make_bot
from resilience.errors import ServiceStartError, classify
from services.config import Config
from services.datadir import DataDirLockedError

log = structlog.get_logger("bot.runner")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_AUTH = 2
EXIT_START = 3
EXIT_UNREACHABLE = 4


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


UNREACHABLE_ERRORS = (
    aiohttp.ClientError,
    discord.GatewayNotFound,
    discord.ConnectionClosed,
    OSError,
    TimeoutError,
)


def unreachable(config: Config, exc: BaseException) -> int:
    where = config.discord_gateway_url or config.discord_api_base or "Discord"
    return fail(
        f"cannot reach {where} ({type(exc).__name__}). Check the network and the URLs.", EXIT_UNREACHABLE
    )


async def serve(config: Config, *, token: str, banner: bool = False) -> int:
    """Run one bot until it is closed (SIGTERM/SIGINT) or fails to start; return the exit code.

    With ``banner``, a start-up banner (who the bot is, its invite URL) goes to stdout once
    the bot is connected.
    """
    for warning in config.warnings:
        log.warning("config.warning", setting=warning.name, problem=warning.problem, fix=warning.fix)
    point_discord_at(config.discord_api_base, config.discord_gateway_url)
    app = build_application(config)
    bot = make_bot(app)
    if banner:

        async def announce() -> None:
            user = bot.user
            print(
                f"Connected to Discord as {user} in {len(bot.guilds)} server(s).\n"
                f"Invite it to a server: {bot.invite_url()}\n"
                f"Gemini model: {config.gemini_model}. Stop with Ctrl-C.",
                flush=True,
            )
            bot.remove_listener(announce, "on_ready")

        bot.add_listener(announce, "on_ready")
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def request_stop(signame: str) -> None:
        if not stopping:
            log.info("bot.signal", signal=signame)
            stopping.append(loop.create_task(bot.close()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, request_stop, sig.name)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not POSIX
            pass
    try:
        await bot.start(token)
    except discord.LoginFailure:
        return fail(
            "Discord rejected DISCORD_TOKEN. Copy the token from the Developer Portal "
            "(your application > Bot > Reset Token) into .env and try again.",
            EXIT_AUTH,
        )
    except discord.PrivilegedIntentsRequired:
        return fail(
            "Discord refused the Message Content intent. Enable it in the Developer Portal "
            "(your application > Bot > Privileged Gateway Intents > Message Content Intent).",
            EXIT_AUTH,
        )
    except ServiceStartError as exc:
        if isinstance(exc.cause, DataDirLockedError):
            # The sentence names the directory and the pid of the process holding it.
            return fail(f"the {exc.service} service did not start: {exc.cause}", EXIT_START)
        verdict = classify(exc.cause)
        return fail(
            f"the {exc.service} service did not start ({verdict.category.value}): "
            f"{type(exc.cause).__name__}. Nothing was left running.",
            EXIT_START,
        )
    except UNREACHABLE_ERRORS as exc:
        return unreachable(config, exc)
    except AttributeError as exc:
        # discord.py 2.7: when the very first gateway connection fails, its reconnect path reads
        # ``self.ws.sequence`` while ``ws`` is still None. The real cause is the connection error.
        if bot.ws is not None or not isinstance(exc.__context__, UNREACHABLE_ERRORS):
            raise
        return unreachable(config, exc.__context__)
    finally:
        if stopping:
            await asyncio.gather(*stopping, return_exceptions=True)
        await bot.close()
    return EXIT_OK
