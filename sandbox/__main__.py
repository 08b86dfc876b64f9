"""``python -m sandbox``: run the Discord and Gemini emulators on loopback until Ctrl-C.

It prints the settings that point the bot at them; ``--chat`` also opens the terminal chat
(``sandbox.console``) on stdin, and ``--env-file PATH`` writes the settings as a dotenv file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

from sandbox.console import Console, stdin_lines
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import GeminiEmulator

DEFAULT_DISCORD_PORT = 5710
DEFAULT_GEMINI_PORT = 5711
# Shaped like a real bot token (three base64url parts) so the bot's config accepts it; not a secret.
SANDBOX_DISCORD_TOKEN = "U0FOREJPWC1MT09QQkFDSy1CT1Q.c2Fu.ZGJveC10b2tlbi1ub3QtYS1zZWNyZXQ"
SANDBOX_GEMINI_KEY = "sandbox-key"


def bot_settings(discord: DiscordEmulator, gemini: GeminiEmulator) -> dict[str, str]:
    """The environment variables that point the bot at both emulators."""
    return {
        "DISCORD_TOKEN": discord.token,
        "DISCORD_API_BASE": discord.api_base,
        "DISCORD_GATEWAY_URL": discord.gateway_url,
        "DISCORD_GUILD_ID": str(discord.guild_id),
        "ADMIN_USER_IDS": str(discord.users["admin"]),
        "GEMINI_API_KEY": gemini.api_key,
        "GEMINI_BASE_URL": gemini.base_url,
    }


def banner(settings: dict[str, str], discord: DiscordEmulator) -> str:
    """What the sandbox prints on start: the settings, the world, and what to do next."""
    lines = ["Sandbox running (loopback only). Point the bot at it with:", ""]
    lines += [f"  export {key}={value}" for key, value in settings.items()]
    lines += [
        "",
        f"  users: {', '.join(f'{k}={v}' for k, v in discord.users.items())}",
        f"  channels: {', '.join(f'#{k}={v}' for k, v in discord.channels.items())}",
        f"  thread in #general: {discord.thread_id}",
        "",
        "Then start the bot (e.g. `python -m bot run`) in another terminal. Ctrl-C stops the sandbox.",
    ]
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def open_emulators(
    *, discord_port: int = 0, gemini_port: int = 0, seed: int = 0, heartbeat_interval: float = 41.25
) -> AsyncIterator[tuple[DiscordEmulator, GeminiEmulator]]:
    """Start both emulators with the sandbox credentials; stop both on exit.

    For embedding the sandbox elsewhere (the bot's own sandbox mode, a chaos run):
    ``async with open_emulators() as (discord, gemini): settings = bot_settings(discord, gemini)``.
    """
    async with (
        DiscordEmulator(token=SANDBOX_DISCORD_TOKEN, port=discord_port,
                        heartbeat_interval=heartbeat_interval) as discord,
        GeminiEmulator(api_key=SANDBOX_GEMINI_KEY, port=gemini_port, seed=seed) as gemini,
    ):
        yield discord, gemini


async def run(
    *,
    discord_port: int = DEFAULT_DISCORD_PORT,
    gemini_port: int = DEFAULT_GEMINI_PORT,
    seed: int = 0,
    chat: bool = False,
    env_file: str | None = None,
    out: TextIO = sys.stdout,
    lines: AsyncIterator[str] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start both emulators, print how to use them, and serve until ``stop`` (or the chat ends)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not main thread
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with open_emulators(discord_port=discord_port, gemini_port=gemini_port, seed=seed) as (
            discord, gemini,
        ):
            settings = bot_settings(discord, gemini)
            if env_file:
                text = "".join(f"{key}={value}\n" for key, value in settings.items())
                await asyncio.to_thread(Path(env_file).write_text, text, encoding="utf-8")
            out.write(banner(settings, discord) + "\n")
            out.flush()
            if chat:
                console = Console(discord, gemini, lines or stdin_lines(), out)
                chat_task = asyncio.create_task(console.run(), name="sandbox-chat")
                stop_task = asyncio.create_task(stop.wait(), name="sandbox-stop")
                await asyncio.wait({chat_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                for task in (chat_task, stop_task):
                    task.cancel()
                await asyncio.gather(chat_task, stop_task, return_exceptions=True)
            else:
                await stop.wait()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the sandbox; Ctrl-C is a normal way out."""
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--discord-port", type=int, default=DEFAULT_DISCORD_PORT, help="0 = any free port")
    parser.add_argument("--gemini-port", type=int, default=DEFAULT_GEMINI_PORT, help="0 = any free port")
    parser.add_argument("--seed", type=int, default=0, help="seed for latency draws")
    parser.add_argument("--chat", action="store_true", help="open the terminal chat on stdin")
    parser.add_argument("--env-file", help="also write the bot's settings to this dotenv file")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(discord_port=args.discord_port, gemini_port=args.gemini_port, seed=args.seed,
                        chat=args.chat, env_file=args.env_file))
    except KeyboardInterrupt:
        print("\nsandbox stopped")
    except OSError as exc:  # most often: the port is taken
        print(f"sandbox could not start: {exc} (try --discord-port 0 --gemini-port 0)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
