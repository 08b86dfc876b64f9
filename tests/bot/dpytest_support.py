"""dpytest's fake Discord around the real ``GeminiBot``: fast tests of ``on_message`` (Intake).

dpytest 0.7 replaces the client's HTTP client, gateway and connection state with fakes that
turn each REST call into the matching gateway event, so a test posts a message and reads what
the bot sent back in microseconds, with no sockets. The bot itself is the real one: its
``setup_hook`` starts the real services (SQLite in ``tmp_path``, the HTTP API on a free port,
google-genai against a started sandbox ``GeminiEmulator``), on a ``SteppedClock``.

What dpytest 0.7 needs to drive a discord.py 2.7 bot, all of it here:

- ``await bot._async_setup_hook()`` before ``dpytest.configure``: discord.py 2.x makes its
  asyncio objects there (``Client.login`` calls it), and dpytest's fakes need the running loop.
- The members intent: dpytest resolves mentions from ``guild.members``, which discord.py only
  caches with it. ``GeminiBot`` asks for its intents from ``bot.client.intents()``, so the
  fixture adds the members intent to what that function returns while the bot is built.
- Reaction payloads: dpytest's lack ``type`` and ``burst``, which discord.py 2.7's
  ``RawReactionActionEvent`` reads; the state's reaction parser gets them filled in.
- Application commands: ``setup_hook`` syncs the slash commands, and the tree still holds the
  HTTP client and state dpytest replaced. The tree is re-attached to the fake state, the fake
  HTTP client accepts a sync (``SyncingFakeHttp``), and the application gets an id.
- Closing: discord.py 2.7's ``close()`` asks the gateway whether it is open, which dpytest's
  fake (no socket at all) cannot answer; the fixture drops it before closing the bot.
- Warning filters: dpytest's and discord.py's DeprecationWarnings are ignored in pyproject.toml.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import discord
import discord.ext.test as dpytest
from discord.ext.test import backend, factories

import bot.client
from bot.app import build_application
from bot.client import GeminiBot
from sandbox.gemini import GeminiEmulator
from services.config import load_config
from tests.clocks import SteppedClock

GEMINI_KEY = "sandbox-key"
APPLICATION_ID = 424_242_424_242_424_242


class SyncingFakeHttp(backend.FakeHttp):
    """dpytest's fake HTTP client, plus the two routes a command sync uses (it has no app commands)."""

    async def bulk_upsert_global_commands(self, application_id: int | str, payload: Any) -> list[Any]:
        return []

    async def bulk_upsert_guild_commands(
        self, application_id: int | str, guild_id: int | str, payload: Any
    ) -> list[Any]:
        return []


_BOT_INTENTS = bot.client.intents


def _with_members() -> discord.Intents:
    """The bot's own intents plus members (dpytest resolves mentions from the member cache)."""
    wanted = _BOT_INTENTS()
    wanted.members = True
    return wanted


@dataclass
class FakeDiscord:
    """The bot under dpytest and the world it sees: one guild with ``general``, ``chat`` (a
    configured chat channel) and ``random``; members ``alice`` and ``bob``; a bot member ``robo``."""

    bot: GeminiBot
    clock: SteppedClock
    gemini: GeminiEmulator
    guild: discord.Guild
    general: discord.TextChannel
    chat: discord.TextChannel
    random: discord.TextChannel
    alice: discord.Member
    bob: discord.Member
    robo: discord.Member

    @property
    def me(self) -> discord.ClientUser:
        user = self.bot.user
        assert user is not None
        return user

    def mention(self) -> str:
        return f"<@{self.me.id}>"

    def post(
        self,
        content: str,
        *,
        channel: discord.TextChannel | discord.DMChannel | None = None,
        author: discord.User | discord.Member | discord.ClientUser | None = None,
        reply_to: discord.Message | None = None,
        attachments: Sequence[str] = (),
    ) -> discord.Message:
        """A user posts a message: stored and dispatched as MESSAGE_CREATE, not yet handled.

        Like ``backend.make_message``, plus a reply reference and attachments by file name. Post
        several, then ``await dpytest.run_all_events()`` to have them handled concurrently.
        """
        channel = channel or self.general
        author = author or self.alice
        guild = getattr(channel, "guild", None)
        data = factories.make_message_dict(
            channel,
            author,
            content=content,
            mentions=[m for m in backend.find_user_mentions(content, guild) if m is not None],
            attachments=[_attachment(name) for name in attachments],
        )
        if reply_to is not None:
            data["message_reference"] = {"message_id": reply_to.id, "channel_id": reply_to.channel.id}
            data["referenced_message"] = factories.dict_from_message(reply_to) | {
                "channel_id": reply_to.channel.id
            }
        state = backend.get_state()
        state.parse_message_create(data)
        assert backend._cur_config is not None
        backend._cur_config.messages.setdefault(channel.id, []).append(data)  # reactions look here
        message = state._get_message(data["id"])
        assert message is not None
        return message

    async def say(self, content: str, **kw: Any) -> discord.Message:
        """``post`` and wait until the bot has handled it."""
        message = self.post(content, **kw)
        await dpytest.run_all_events()
        return message

    def sent(self) -> list[discord.Message]:
        """What the bot sent since the last call (dpytest's queue of sent messages, emptied)."""
        out = []
        while not dpytest.sent_queue.empty():
            out.append(dpytest.sent_queue.get_nowait())
        return out

    def reactions(self, message: discord.Message) -> list[str]:
        """The emoji the bot put on ``message``."""
        return [str(r.emoji) for r in message.reactions if r.me]


def _attachment(name: str) -> discord.Attachment:
    data = factories.make_attachment_dict(name, 1, f"https://cdn.invalid/{name}", f"https://cdn.invalid/{name}")
    return discord.Attachment(data=data, state=backend.get_state())


@contextlib.contextmanager
def _reaction_payloads_for_discord_2_7(state: Any) -> Iterator[None]:
    """Fill in ``type`` and ``burst``, which dpytest's reaction payloads lack, on their way in."""
    parse = state.parse_message_reaction_add

    def parse_with_defaults(data: dict[str, Any]) -> None:
        parse({"type": 0, "burst": False, **data})

    state.parse_message_reaction_add = parse_with_defaults
    yield


@contextlib.asynccontextmanager
async def dpytest_bot(tmp_path: Path, gemini: GeminiEmulator, **settings: str) -> AsyncIterator[FakeDiscord]:
    """The real ``GeminiBot`` on dpytest's fake Discord, its services started; closed on exit.

    ``settings`` are configuration variables on top of test-sized defaults (rate limits high
    enough for bursts: tests of the cooldown set their own).
    """
    environ = {
        "GEMINI_API_KEY": GEMINI_KEY,
        "GEMINI_BASE_URL": gemini.base_url,
        "DATA_DIR": str(tmp_path / "data"),
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "0",
        "LOG_FORMAT": "console",
        "GEMINI_TIMEOUT_SECONDS": "5",
        "PROCESSING_TIMEOUT_SECONDS": "10",
        "MUTEX_ACQUIRE_TIMEOUT_SECONDS": "2",
        "USER_RATE_LIMIT_PER_MINUTE": "1000",
        "GUILD_RATE_LIMIT_PER_MINUTE": "10000",
        "PLUGINS": "none",  # plugins' own tests load them (PLUGINS=remind)
        **settings,
    }
    config = load_config(environ=environ, env_file=None)
    clock = SteppedClock()
    app = build_application(config, clock=clock)
    with mock.patch.object(bot.client, "intents", _with_members):
        client = GeminiBot(app, check_models=False)  # the tests count the Gemini requests messages cause
    await client._async_setup_hook()
    with mock.patch.object(backend, "FakeHttp", SyncingFakeHttp):
        dpytest.configure(
            client, guilds=["Test Guild"], text_channels=["general", "chat", "random"], voice_channels=0,
            members=["alice", "bob"],
        )
    state = backend.get_state()
    state.application_id = APPLICATION_ID
    client.tree._http = client.http  # the tree was built with the clients dpytest replaced
    client.tree._state = state
    state._command_tree = client.tree
    config_ = dpytest.get_config()
    guild = config_.guilds[0]
    general, chat, random_ = config_.channels
    assert all(isinstance(c, discord.TextChannel) for c in (general, chat, random_))
    alice, bob = config_.members
    robo_user = state.store_user(factories.make_user_dict("robo", "0099", None, bot=True))  # type: ignore[arg-type]
    robo = backend.make_member(robo_user, guild)
    try:
        with _reaction_payloads_for_discord_2_7(state):
            await client.setup_hook()
            app.store.save("guild_settings", {"guilds": {str(guild.id): {"chat_channels": [chat.id]}}})
            app.reload_settings()
            yield FakeDiscord(
                client, clock, gemini, guild, general, chat, random_,  # type: ignore[arg-type]
                alice, bob, robo,
            )
    finally:
        client.ws = None  # type: ignore[assignment]  # dpytest's socket never opened: nothing to close
        await client.close()
        await dpytest.empty_queue()
