"""Per-server settings: what a guild's managers choose, and what applies to one message.

A guild's managers set each setting (``/settings``, ``/model``) for the whole server or for one
category, channel, forum or thread. What applies to a message is resolved from the most specific
place outwards: the thread, its parent channel (or forum), the channel's category, the server, and
last the bot's default (its configuration). ``SettingsCache.explain`` says, for each setting, the
value and where it comes from (``/settings show``).

The settings live in the DataStore's ``guild_settings`` file (validated, with its backups: see
``services.datastore.validate_guild_settings``), per guild under ``settings``: ``server`` holds the
whole server's values, ``channels`` the values of one category, channel, forum or thread by id. Two
settings keep their older homes, so the older commands and this one agree: the chat channels
(``chat_channels``, also ``/server channels``) and Search grounding for the whole server (``tools``,
also ``/server tools``). A guild's ``persona`` written by an older version is its server persona.

Everything here reads memory only: ``SettingsCache.load`` rebuilds the view from the file after
start-up and after each change, ``is_chat`` is the check on the hot path (a set lookup, and two
more for a thread or a channel in a category), and ``effective`` runs once per message addressed
to the bot. Values a manager types are checked by ``parse`` against the bot's configuration (the
allowed models, the output ceiling, the history kept) and refused with one sentence naming the limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import discord

from services.config import SAFETY_THRESHOLDS, Config
from services.datastore import MAX_PERSONA_CHARS
from services.gemini import GenerationOptions

MAX_SCOPES = 200
"""Categories, channels, forums and threads of one guild with settings of their own, at most."""
MIN_OUTPUT_TOKENS = 16
"""The shortest answer ceiling a guild may set (as ``GEMINI_MAX_OUTPUT_TOKENS``'s range)."""
SERVER = "server"
"""The source of a value the server's managers set for the whole server."""
DEFAULT = "default"
"""The source of a value nobody set: the bot's configuration."""
GROUNDING_TOOL = "google_search"


class InvalidSettingError(ValueError):
    """A setting's name, value or place is not allowed; the message is one sentence for the manager."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the bot's configuration allows a guild to choose."""

    models: tuple[str, ...]
    max_output_tokens: int
    history: int

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(config.allowed_models(), config.gemini_max_output_tokens, config.history_max_messages)


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name, what it does, where it may be set, how a typed value is read."""

    name: str
    label: str
    describe: str
    parse: Callable[[str, Limits], Any]
    show: Callable[[Any], str]
    server_only: bool = False
    channel_only: bool = False


_ON = frozenset({"on", "true", "yes", "1", "enable", "enabled"})
_OFF = frozenset({"off", "false", "no", "0", "disable", "disabled"})
_SAFETY_ALIASES = {
    "none": "block_none",
    "only_high": "block_only_high",
    "high": "block_only_high",
    "medium": "block_medium_and_above",
    "medium_and_above": "block_medium_and_above",
    "low": "block_low_and_above",
    "low_and_above": "block_low_and_above",
}
_CHANNEL = re.compile(r"<#(\d{1,20})>|(\d{1,20})")


def _persona(text: str, limits: Limits) -> str:
    persona = text.strip()
    if not persona:
        raise InvalidSettingError("a persona needs some text: it is the instruction Gemini follows")
    if len(persona) > MAX_PERSONA_CHARS:
        raise InvalidSettingError(
            f"a persona can be at most {MAX_PERSONA_CHARS:,} characters long, and this one has "
            f"{len(persona):,}"
        )
    return persona


def _model(text: str, limits: Limits) -> str:
    model = text.strip()
    if model not in limits.models:
        raise InvalidSettingError(
            f"I can't use the model {model[:100]!r}: this bot allows {', '.join(limits.models)}"
        )
    return model


def _temperature(text: str, limits: Limits) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise InvalidSettingError(
            f"{text.strip()[:40]!r} is not a number: the temperature is a number from 0 to 2"
        ) from None
    if value != value or not 0 <= value <= 2:
        raise InvalidSettingError(
            f"a temperature of {text.strip()[:40]} is out of range: use a number from 0 to 2"
        )
    return value


def _max_output_tokens(text: str, limits: Limits) -> int:
    high = limits.max_output_tokens
    try:
        value = int(text.strip().replace(",", "").replace("_", ""))
    except ValueError:
        value = -1
    if not MIN_OUTPUT_TOKENS <= value <= high:
        raise InvalidSettingError(
            f"the longest answer is a whole number of tokens from {MIN_OUTPUT_TOKENS} to {high:,} "
            f"(this bot's ceiling, GEMINI_MAX_OUTPUT_TOKENS), not {text.strip()[:40]}"
        )
    return value


def _history(text: str, limits: Limits) -> int:
    high = limits.history
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= high:
        raise InvalidSettingError(
            f"the history is a whole number of earlier messages from 0 to {high} (what this bot keeps, "
            f"HISTORY_MAX_MESSAGES), not {text.strip()[:40]}"
        )
    return value


def _safety(text: str, limits: Limits) -> str:
    word = text.strip().lower().replace(" ", "_").replace("-", "_")
    value = _SAFETY_ALIASES.get(word, word)
    if value not in SAFETY_THRESHOLDS:
        raise InvalidSettingError(
            f"{text.strip()[:40]!r} is not a safety threshold: use one of {', '.join(SAFETY_THRESHOLDS)}"
        )
    return value


def _flag(text: str, limits: Limits) -> bool:
    word = text.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise InvalidSettingError(f"{text.strip()[:40]!r} is neither on nor off: use on or off")


_FUNCTION = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_FUNCTION_NAMES = 32


def _functions(text: str, limits: Limits) -> list[str]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in re.split(r"[,\s]+", text) if n.strip()))
    if names in (("off",), ("none",)):
        return []
    bad = [n for n in names if not _FUNCTION.fullmatch(n) or n in ("off", "none")]
    if bad or not names or len(names) > MAX_FUNCTION_NAMES:
        raise InvalidSettingError(
            "name the functions Gemini may call, comma-separated: tool names or the levels read, write "
            f"and admin (at most {MAX_FUNCTION_NAMES}), or off"
        )
    return list(names)


def _channel(text: str, limits: Limits) -> int:
    found = _CHANNEL.fullmatch(text.strip())
    if found is None:
        raise InvalidSettingError("name a channel: #channel, or its id")
    return int(found.group(1) or found.group(2))


def _on_off(value: Any) -> str:
    return "on" if value else "off"


def _quoted(value: Any) -> str:
    text = " ".join(str(value).split())
    return f"“{text[:120]}{'…' if len(text) > 120 else ''}” ({len(str(value)):,} characters)"


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "persona", "Persona", "the instruction Gemini follows (its system instruction)", _persona, _quoted
        ),
        Setting("model", "Model", "the Gemini model asked first", _model, lambda v: f"`{v}`"),
        Setting(
            "temperature", "Temperature", "0 (focused) to 2 (varied)", _temperature,
            lambda v: "the model's default" if v is None else f"{v:g}",
        ),
        Setting(
            "max_output_tokens", "Longest answer", "in tokens (about 4 characters each)", _max_output_tokens,
            lambda v: f"{v:,} tokens",
        ),
        Setting(
            "safety", "Safety filter", f"Gemini's block threshold: {', '.join(SAFETY_THRESHOLDS)}", _safety,
            lambda v: "Gemini's default" if v is None else f"`{v}`",
        ),
        Setting(
            "history", "History", "earlier messages sent with a question", _history, lambda v: f"{v} messages"
        ),
        Setting(
            "grounding", "Search grounding", "answers grounded in Google Search, with sources", _flag, _on_off
        ),
        Setting(
            "streaming", "Streaming", "answers appear as Gemini writes them", _flag,
            lambda v: "the bot's default" if v is None else _on_off(v),
        ),
        Setting(
            "chat", "Chat channel", "answer every message, not only mentions", _flag, _on_off,
            channel_only=True,
        ),
        Setting("auto_thread", "Auto-thread", "answer a mention in a new thread", _flag, _on_off),
        Setting(
            "functions", "Functions", "what Gemini may look up or do here (tool names or read, write, admin)",
            _functions, lambda v: ", ".join(f"`{n}`" for n in v) if v else "none",
        ),
        Setting(
            "modlog_channel", "Moderation log", "where blocked questions and answers are recorded", _channel,
            lambda v: "none" if v is None else f"<#{v}>", server_only=True,
        ),
        Setting(
            "modlog_text", "Log message text", "the moderation log quotes the blocked message", _flag,
            _on_off, server_only=True,
        ),
        Setting(
            "memory", "Server memory", "remember what is said here and recall it when relevant (bot.memory)",
            _flag, _on_off, server_only=True,
        ),
        Setting(
            "answer_cache", "Answer cache", "the same question in the same context gets the stored answer",
            _flag, _on_off,
        ),
        Setting(
            "offline_answers", "Cached answers offline",
            "while Gemini is down, /ask shows an earlier answer to the same question, marked and dated",
            _flag, _on_off, server_only=True,
        ),
    )
}
"""Every setting, in the order ``/settings show`` lists them."""


def setting(name: str) -> Setting:
    """The setting ``name``, or ``InvalidSettingError`` naming the settings there are."""
    found = SETTINGS.get(name.strip().lower())
    if found is None:
        raise InvalidSettingError(
            f"there is no setting {name[:40]!r}; the settings are {', '.join(SETTINGS)}"
        )
    return found


def parse(name: str, text: str, limits: Limits) -> Any:
    """The value of setting ``name`` a manager typed as ``text``; ``InvalidSettingError`` when refused."""
    return setting(name).parse(text, limits)


def recent(history: Sequence[Any], count: int) -> list[Any]:
    """The newest ``count`` turns of ``history`` (a server's ``history`` setting), oldest first."""
    return list(history[len(history) - count :]) if 0 <= count < len(history) else list(history)


def fallback_note(model: str, chosen: str | None) -> str:
    """The line after an answer a fallback model wrote (``chosen`` was unavailable), else ""."""
    if not chosen or not model or model == chosen:
        return ""
    return f"-# Answered by `{model}`: `{chosen}` is unavailable right now."


@dataclass(frozen=True, slots=True)
class Effective:
    """The settings that apply to one message; ``tools`` are the Google-run tools to send."""

    persona: str
    model: str
    temperature: float | None
    max_output_tokens: int
    safety: str | None
    history: int
    grounding: bool
    streaming: bool | None
    auto_thread: bool
    tools: tuple[str, ...] = ()
    modlog_channel: int | None = None
    modlog_text: bool = False
    functions: tuple[str, ...] = ()
    """Functions Gemini may call (``bot.tools``): tool names and levels (read, write, admin)."""
    functions_by_guild: bool = False
    """Whether ``functions`` is the server's own choice (admin tools need it) or the bot's default."""
    memory: bool = False
    answer_cache: bool = False
    offline_answers: bool = False

    def options(self) -> GenerationOptions:
        """The Gemini request options these settings make."""
        return GenerationOptions(
            model=self.model,
            temperature=self.temperature,
            max_output_tokens=self.max_output_tokens,
            safety_threshold=self.safety,
        )


@dataclass(frozen=True, slots=True)
class Explained:
    """One line of ``/settings show``: the value that applies and where it comes from: ``SERVER``,
    ``DEFAULT``, or the id of the category, channel, forum or thread that set it."""

    setting: Setting
    value: Any
    source: str | int


@dataclass(frozen=True, slots=True)
class _Guild:
    """One guild's settings as the cache holds them."""

    server: Mapping[str, Any]
    scopes: Mapping[int, Mapping[str, Any]]
    chat: frozenset[int]
    tools: tuple[str, ...]


def scope_chain(channel: Any) -> tuple[int, ...]:
    """Where a channel's settings are looked up, most specific first: a thread, its parent channel
    or forum, that channel's category; a channel and its category; nothing for a DM. No I/O (a
    thread whose parent is not cached is looked up without the category)."""
    if channel is None or getattr(channel, "guild", None) is None:
        return ()
    if isinstance(channel, discord.Thread):
        parent = channel.guild.get_channel(channel.parent_id)
        category = getattr(parent, "category_id", None)
        chain = (channel.id, channel.parent_id)
        return chain if category is None else (*chain, category)
    category = getattr(channel, "category_id", None)
    return (channel.id,) if category is None else (channel.id, category)


class SettingsCache:
    """Every guild's settings in memory, and the bot's defaults; rebuilt by ``load``."""

    def __init__(self, config: Config) -> None:
        self.limits = Limits.from_config(config)
        self.defaults: dict[str, Any] = {
            "persona": config.bot_persona,
            "model": config.gemini_model,
            "temperature": config.gemini_temperature,
            "max_output_tokens": config.gemini_max_output_tokens,
            "safety": config.gemini_safety_threshold,
            "history": config.history_max_messages,
            "grounding": False,
            "streaming": None,
            "chat": False,
            "auto_thread": False,
            "modlog_channel": None,
            "modlog_text": False,
            "functions": tuple(config.tools_default),
            "memory": False,
            "answer_cache": config.answer_cache,
            "offline_answers": False,
        }
        self._guilds: dict[int, _Guild] = {}
        self._chat: dict[int, frozenset[int]] = {}
        self._bot = Effective(
            persona=config.bot_persona,
            model=config.gemini_model,
            temperature=config.gemini_temperature,
            max_output_tokens=config.gemini_max_output_tokens,
            safety=config.gemini_safety_threshold,
            history=config.history_max_messages,
            grounding=False,
            streaming=None,
            auto_thread=False,
            functions=tuple(config.tools_default),
            answer_cache=config.answer_cache,
        )

    def load(self, data: Mapping[str, Any] | None) -> None:
        """Rebuild the view from the ``guild_settings`` file's content."""
        guilds: dict[int, _Guild] = {}
        for gid, entry in ((data or {}).get("guilds") or {}).items():
            stored = entry.get("settings") or {}
            server = dict(stored.get("server") or {})
            if "persona" not in server and entry.get("persona"):
                server["persona"] = entry["persona"]  # written by an older version: the server's persona
            tools = tuple(name for name, on in (entry.get("tools") or {}).items() if on)
            server["grounding"] = GROUNDING_TOOL in tools
            scopes = {int(cid): dict(values) for cid, values in (stored.get("channels") or {}).items()}
            chat = frozenset(int(c) for c in entry.get("chat_channels") or ())
            guilds[int(gid)] = _Guild(server, scopes, chat, tools)
        self._guilds = guilds
        self._chat = {gid: g.chat for gid, g in guilds.items() if g.chat}

    # -- the hot path ----------------------------------------------------------------------------

    def chat_channels(self, guild_id: int) -> frozenset[int]:
        """The channels, threads, forums and categories of a guild where the bot answers every message."""
        return self._chat.get(guild_id, frozenset())

    def is_chat(self, guild_id: int, channel: Any) -> bool:
        """Whether the bot answers every message in ``channel`` (a channel, thread or forum post of
        guild ``guild_id``): it, its parent or its category is a chat channel. Memory only."""
        chat = self._chat.get(guild_id)
        if not chat:
            return False
        if channel.id in chat:
            return True
        if isinstance(channel, discord.Thread):
            if channel.parent_id in chat:
                return True
            parent = channel.guild.get_channel(channel.parent_id)
            return getattr(parent, "category_id", None) in chat
        return getattr(channel, "category_id", None) in chat

    # -- one message -----------------------------------------------------------------------------

    def effective(self, guild_id: int | None, chain: Sequence[int] = ()) -> Effective:
        """The settings for a message in guild ``guild_id`` whose channel's ``scope_chain`` is ``chain``
        (the bot's defaults in a DM)."""
        guild = self._guilds.get(guild_id) if guild_id is not None else None
        if guild is None:
            return self._bot
        resolved = {name: self._resolve(guild, chain, name) for name in SETTINGS}
        values = {name: value for name, (value, _) in resolved.items()}
        grounding = bool(values["grounding"])
        tools = tuple(t for t in guild.tools if t != GROUNDING_TOOL)
        if grounding:
            tools = (GROUNDING_TOOL, *tools)
        model = values["model"] if values["model"] in self.limits.models else self.defaults["model"]
        return Effective(
            persona=values["persona"],
            model=model,
            temperature=values["temperature"],
            max_output_tokens=min(int(values["max_output_tokens"]), self.limits.max_output_tokens),
            safety=values["safety"],
            history=min(int(values["history"]), self.limits.history),
            grounding=grounding,
            streaming=values["streaming"],
            auto_thread=bool(values["auto_thread"]),
            tools=tools,
            modlog_channel=guild.server.get("modlog_channel"),
            modlog_text=bool(guild.server.get("modlog_text", False)),
            functions=tuple(values["functions"]),
            functions_by_guild=resolved["functions"][1] != DEFAULT,
            memory=bool(values["memory"]),
            answer_cache=bool(values["answer_cache"]),
            offline_answers=bool(values["offline_answers"]),
        )

    def personas(self) -> set[str]:
        """Every persona some message may be answered with now (the bot's, each guild's, each place's)."""
        found = {str(self.defaults["persona"])}
        for guild in self._guilds.values():
            if guild.server.get("persona"):
                found.add(str(guild.server["persona"]))
            found.update(str(v["persona"]) for v in guild.scopes.values() if v.get("persona"))
        return found

    def explain(self, guild_id: int, chain: Sequence[int]) -> list[Explained]:
        """Every setting's value for ``chain`` in guild ``guild_id`` and where it comes from."""
        guild = self._guilds.get(guild_id) or _Guild({}, {}, frozenset(), ())
        return [Explained(s, *self._resolve(guild, chain, s.name)) for s in SETTINGS.values()]

    def _resolve(self, guild: _Guild, chain: Sequence[int], name: str) -> tuple[Any, str | int]:
        if name == "chat":
            for scope in chain:
                if scope in guild.chat:
                    return True, scope
            return False, DEFAULT
        if not SETTINGS[name].server_only:
            for scope in chain:
                values = guild.scopes.get(scope)
                if values is not None and name in values:
                    return values[name], scope
        if name in guild.server and (name != "grounding" or guild.server[name]):
            return guild.server[name], SERVER
        return self.defaults[name], DEFAULT

    def value_at(self, guild_id: int, scope: int | None, name: str) -> Any:
        """The value of ``name`` set exactly at ``scope`` (the server when None), or None."""
        guild = self._guilds.get(guild_id)
        if guild is None:
            return None
        values = guild.server if scope is None else guild.scopes.get(scope, {})
        return values.get(name)

    def scopes(self, guild_id: int) -> dict[int, dict[str, Any]]:
        """The categories, channels, forums and threads of a guild with settings of their own."""
        guild = self._guilds.get(guild_id)
        return {} if guild is None else {k: dict(v) for k, v in guild.scopes.items()}

    def __len__(self) -> int:
        return len(self._guilds)
