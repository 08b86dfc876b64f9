"""The bot's configuration: one frozen object, loaded once from the environment and ``.env``.

``load_config()`` reads every setting, validates all of them, and raises one ``ConfigError``
listing every problem (variable name, what is wrong, how to fix it) instead of stopping at
the first. Secrets never appear in an error message, a ``repr`` or ``redacted()``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values

DEFAULT_PERSONA = (
    "You are a helpful, friendly assistant chatting in a Discord server. Answer clearly and "
    "concisely, and use Discord markdown when it helps."
)

GEMINI_FIRST_TOKEN_SECONDS = 2.0
"""What a Gemini answer's timeout allows before the first token, on top of the tokens' time."""

# What the bot can pass to Gemini (ATTACHMENT_TYPES): bot/attachments.py maps files to these kinds.
ATTACHMENT_KINDS = frozenset({"image", "text", "pdf", "audio", "video"})

# Gemini's block thresholds (google-genai ``types.HarmBlockThreshold``), in the lower case the
# settings use; unset means Gemini's own default (the adjustable filters are off for current models).
SAFETY_THRESHOLDS = ("off", "block_none", "block_only_high", "block_medium_and_above", "block_low_and_above")
# Models a server may choose (GEMINI_ALLOWED_MODELS): each has a breaker, and /model lists them all
# (Discord shows at most 25 autocomplete choices).
MAX_ALLOWED_MODELS = 20

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("console", "json")

# Three dot-separated base64url parts: user id, timestamp, HMAC (Discord's bot token layout).
_BOT_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One invalid (or, as a warning, risky) setting: which variable, what is wrong, how to fix it."""

    name: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}\n    fix: {self.fix}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        count = len(self.problems)
        head = f"The configuration has {count} problem{'s' if count != 1 else ''}:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def __str__(self) -> str:
        return self._message()


class _Invalid(Exception):
    """Raised by a parser; becomes a ``ConfigProblem`` for the variable being parsed."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Config:
    """Every setting of the bot, typed and validated.

    Field names are the environment variable names in lower case. Secret fields are
    excluded from ``repr``; use ``redacted()`` to show the configuration and ``secrets()``
    to feed the log redactor.
    """

    # Discord
    discord_token: str | None = field(default=None, repr=False)
    discord_guild_id: int | None = None
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None
    discord_timeout_seconds: float = 15.0
    # Gemini
    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_model: str = "gemini-2.5-flash"
    gemini_fallback_models: tuple[str, ...] = ()
    gemini_allowed_models: tuple[str, ...] = ()
    gemini_temperature: float | None = None
    gemini_safety_threshold: str | None = None
    gemini_base_url: str | None = None
    gemini_timeout_seconds: float = 30.0
    gemini_max_output_tokens: int = 2048
    gemini_tokens_per_second: float = 100.0
    bot_persona: str = DEFAULT_PERSONA
    # Behaviour
    mutex_acquire_timeout_seconds: float = 5.0
    processing_timeout_seconds: float = 30.0
    user_rate_limit_per_minute: int = 6
    guild_rate_limit_per_minute: int = 60
    max_input_chars: int = 4000
    history_max_messages: int = 20
    history_max_chars: int = 12000
    history_max_tokens: int = 4000
    long_answer_chars: int = 6000
    code_file_chars: int = 1500
    # Streaming (bot/streaming.py): answers appear as Gemini writes them, edited in place.
    streaming: bool = True
    stream_edit_interval_seconds: float = 1.0
    stream_silence_seconds: float = 10.0
    # Functions the model may call (bot/tools.py): which are on where a server set nothing, the
    # rounds of calls per answer, the time they may take together, and whether their arguments and
    # results are logged (they may hold what users wrote).
    tools_default: tuple[str, ...] = ()
    tools_max_rounds: int = 5
    tools_total_seconds: float = 20.0
    tools_log_payloads: bool = False
    # Semantic memory (bot/memory.py) and caching (bot/answer_cache.py, services/context_cache.py)
    memory_embedding_model: str = "gemini-embedding-001"
    memory_embedding_dimensions: int = 256
    memory_top_k: int = 5
    memory_max_tokens: int = 600
    memory_max_items: int = 1000
    answer_cache: bool = False
    answer_cache_max_entries: int = 1000
    answer_cache_ttl_seconds: float = 3600.0
    context_cache_ttl_seconds: float = 3600.0
    quota_user_tokens_per_day: int = 0
    quota_guild_tokens_per_day: int = 0
    retry_max_attempts: int = 3
    retry_hint_cap_seconds: float = 20.0
    breaker_fail_max: int = 5
    breaker_reset_seconds: float = 30.0
    queue_max_attempts: int = 5
    queue_max_age_seconds: float = 86400.0
    queue_drain_per_second: float = 20.0
    maintenance_queue_messages: bool = True
    shutdown_grace_seconds: float = 10.0
    # Storage
    data_dir: Path = Path("data")
    backup_keep: int = 10
    queue_max_items: int = 10_000
    queue_max_pending_per_user: int = 5
    queue_max_pending_per_guild: int = 50
    queue_retention_seconds: float = 7 * 86400.0
    history_retention_seconds: float = 30 * 86400.0
    # PostgreSQL instead of SQLite and the JSON files (several processes on one database); a secret:
    # the URL may hold a password.
    database_url: str | None = field(default=None, repr=False)
    database_pool_size: int = 10
    # Sharding (discord.py's AutoShardedClient): None and () = one unsharded gateway session, the
    # single-process default; "auto" (0 here) = Discord's recommended count, every shard in this
    # process; N with no ids = shards 0..N-1 in this process; N with ids = those shards only.
    shard_count: int | None = None
    shard_ids: tuple[int, ...] = ()
    # Attachments (bot/attachments.py)
    attachment_max_file_bytes: int = 8 * 1024 * 1024
    attachment_max_message_bytes: int = 20 * 1024 * 1024
    attachment_max_count: int = 10
    attachment_types: frozenset[str] = ATTACHMENT_KINDS
    attachment_spool_max_bytes: int = 256 * 1024 * 1024
    gemini_inline_max_bytes: int = 10 * 1024 * 1024
    # Operations
    http_host: str = "127.0.0.1"
    http_port: int = 3000
    admin_api_token: str | None = field(default=None, repr=False)
    admin_user_ids: frozenset[int] = frozenset()
    log_level: str = "INFO"
    log_format: str = "console"
    log_payloads: bool = False
    # Tracing: a request (or one of its steps) this slow is kept among the slow traces; spans also
    # go to an OpenTelemetry collector at this OTLP/HTTP endpoint when it is set (the [otel] extra).
    trace_slow_seconds: float = 5.0
    otel_exporter_otlp_endpoint: str | None = None
    # Health, alerts, availability (bot.health, bot.alerts)
    health_interval_seconds: float = 30.0
    degraded_queue_age_seconds: float = 60.0
    alert_channel_id: int | None = None
    alert_webhook_url: str | None = field(default=None, repr=False)
    alert_dm_owners: bool = False
    alert_repeat_seconds: float = 3600.0
    alert_breaker_open_seconds: float = 60.0
    alert_queue_age_seconds: float = 300.0
    alert_dead_letters_per_hour: int = 1
    alert_memory_mb: int = 1024
    alert_error_rate: float = 0.25
    availability_slo: float = 0.999
    # Plugins (bot/plugins.py): discord.py extensions in PLUGINS_DIR (default: the repository's
    # ``plugins`` package) and installed under the ``gemini_bot.plugins`` entry-point group.
    plugins_dir: Path | None = None
    plugins: tuple[str, ...] | None = None  # None: every plugin found
    required_plugins: frozenset[str] = frozenset()
    plugin_load_timeout_seconds: float = 10.0
    command_sync_interval_seconds: float = 30.0
    # Guarded self-modification (bot/selfmod.py): owners may have Gemini change a plugin's file.
    self_modify: bool = False
    self_modify_test_timeout_seconds: float = 60.0
    # Self-healing (bot.healing): the healer acts at most heal_max_actions_per_hour times per kind of
    # action; the gateway is reconnected after this many silent seconds (below discord.py's 60 s);
    # gc runs and caches are trimmed above this resident memory.
    heal_enabled: bool = True
    heal_max_actions_per_hour: int = 3
    heal_gateway_silence_seconds: float = 45.0
    heal_memory_mb: int = 768
    # Risky but valid settings (a non-loopback HTTP_HOST, an .env or DATA_DIR other users can
    # read); shown by `check` and logged at start.
    warnings: tuple[ConfigProblem, ...] = field(default=(), compare=False)

    @property
    def discord_mode(self) -> Literal["live", "sandbox"]:
        """``"live"`` with a bot token, else ``"sandbox"`` (the loopback Discord emulator)."""
        return "live" if self.discord_token else "sandbox"

    def allowed_models(self) -> tuple[str, ...]:
        """The models a server may choose with ``/model``, the default chain first: ``GEMINI_MODEL``,
        ``GEMINI_FALLBACK_MODELS``, then the rest of ``GEMINI_ALLOWED_MODELS``."""
        chain = (self.gemini_model, *self.gemini_fallback_models, *self.gemini_allowed_models)
        return tuple(dict.fromkeys(chain))

    def gemini_timeout_floor(self) -> float:
        """The shortest timeout a Gemini call gets: time for the longest answer allowed
        (``gemini_max_output_tokens`` at ``gemini_tokens_per_second``) plus the first token's wait.

        The adaptive timeout follows recent answer times, which are mostly short; without this
        floor a long answer (an essay) after a run of quick ones would time out every attempt.
        """
        return GEMINI_FIRST_TOKEN_SECONDS + self.gemini_max_output_tokens / self.gemini_tokens_per_second

    @property
    def gemini_mode(self) -> Literal["live", "sandbox"]:
        """``"live"`` with an API key, else ``"sandbox"`` (the loopback Gemini emulator)."""
        return "live" if self.gemini_api_key else "sandbox"

    @property
    def sharded(self) -> bool:
        """Whether the bot runs as discord.py's AutoShardedClient (``SHARD_COUNT`` is set)."""
        return self.shard_count is not None

    def secrets(self) -> tuple[str, ...]:
        """The secret values that are set, for the log redactor (a database URL's password also on
        its own: a driver's message may quote it without the rest of the URL)."""
        values = [getattr(self, name) for name in SECRET_FIELDS]
        if self.database_url:
            values.append(urlsplit(self.database_url).password)
        return tuple(v for v in values if v)

    def redacted(self) -> dict[str, str]:
        """Every setting by variable name, as text, with secrets shown as ``<set, N chars>``."""
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name == "warnings":
                continue
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                text = f"<set, {len(value)} chars>" if value else "<not set>"
            elif f.name == "shard_count" and value == SHARD_AUTO:
                text = "auto"
            else:
                text = _show(value)
            out[f.name.upper()] = text
        return out


SECRET_FIELDS = frozenset(
    {"discord_token", "gemini_api_key", "admin_api_token", "alert_webhook_url", "database_url"}
)

# An incoming webhook's URL: .../api[/v10]/webhooks/<id>/<token> (Discord > channel settings >
# Integrations > Webhooks > Copy Webhook URL). The token is a secret.
_WEBHOOK_PATH = re.compile(r"/webhooks/(?P<id>[0-9]{1,20})/(?P<token>[A-Za-z0-9._-]+)/?")


def webhook_parts(url: str) -> tuple[int, str]:
    """The id and token of an incoming webhook URL (validated by the ``ALERT_WEBHOOK_URL`` parser)."""
    found = _WEBHOOK_PATH.search(urlsplit(url).path)
    if found is None:
        raise ValueError("not a webhook URL")
    return int(found["id"]), found["token"]


def _show(value: object) -> str:
    """Render a non-secret value for display."""
    if value is None:
        return "<not set>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | frozenset) and not value:
        return "<none>"
    if isinstance(value, frozenset):
        return ",".join(str(v) for v in sorted(value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --- parsers: text -> value, raising _Invalid with a problem and a fix ---------------------------


class _Number:
    """A parser for an int or float in ``[low, high]``; the bounds are public for tests and docs."""

    def __init__(self, kind: type[int] | type[float], low: float, high: float) -> None:
        self.kind, self.low, self.high = kind, low, high
        self.noun = "a whole number" if kind is int else "a number"

    def __call__(self, text: str) -> int | float:
        noun, low, high = self.noun, self.low, self.high
        try:
            value = self.kind(text)
        except ValueError:
            raise _Invalid(
                f"{text!r} is not {noun}", f"set it to {noun} between {low:g} and {high:g}"
            ) from None
        if value != value or not low <= value <= high:  # value != value catches NaN
            raise _Invalid(f"{text} is out of range", f"set it to {noun} between {low:g} and {high:g}")
        return value




def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _Invalid(f"{text!r} is not a boolean", "use true/false, 1/0 or yes/no")


def _url(*schemes: str) -> Callable[[str], str]:
    """A parser for an absolute URL with one of ``schemes``."""
    example = f"{schemes[0]}://127.0.0.1:8080"

    def parse(text: str) -> str:
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.netloc:
            raise _Invalid(
                f"{text!r} is not a URL with a {' or '.join(s + '://' for s in schemes)} scheme and a host",
                f"write the full URL, e.g. {example}, or leave it empty for the default",
            )
        return text.rstrip("/")

    return parse


def _choice(allowed: tuple[str, ...], normalise: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = normalise(text)
        if value not in allowed:
            raise _Invalid(f"{text!r} is not one of {', '.join(allowed)}", f"use one of {', '.join(allowed)}")
        return value

    return parse


def _is_snowflake(text: str) -> bool:
    return re.fullmatch(r"[0-9]{1,20}", text) is not None and 0 < int(text) < 2**64


def _snowflake(text: str) -> int:
    if not _is_snowflake(text):
        raise _Invalid(
            f"{text!r} is not a Discord id",
            "use the numeric id (Discord > Settings > Advanced > Developer Mode, then right-click > Copy ID)",
        )
    return int(text)


def _user_ids(text: str) -> frozenset[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if not _is_snowflake(item)]
    if bad:
        raise _Invalid(
            f"not numeric Discord user ids: {', '.join(repr(b) for b in bad)}",
            "use comma-separated numeric user ids, e.g. 123456789012345678,234567890123456789",
        )
    return frozenset(int(item) for item in items)


def _plugin_names(text: str) -> tuple[str, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item)]
    if bad:
        raise _Invalid(
            f"not plugin names: {', '.join(repr(b) for b in bad)}",
            "use comma-separated plugin names (a module name each, e.g. remind,weather)",
        )
    return tuple(dict.fromkeys(items))


def _plugin_names_or_all(text: str) -> tuple[str, ...] | None:
    lowered = text.strip().lower()
    if lowered == "*":
        return None
    return () if lowered == "none" else _plugin_names(text)


def _plugin_name_set(text: str) -> frozenset[str]:
    return frozenset(_plugin_names(text))


def _attachment_kinds(text: str) -> frozenset[str]:
    items = {item.strip().lower() for item in text.split(",") if item.strip()} - {"none"}
    unknown = sorted(items - ATTACHMENT_KINDS)
    if unknown:
        raise _Invalid(
            f"unknown attachment kinds: {', '.join(unknown)}",
            f"use a comma-separated subset of {', '.join(sorted(ATTACHMENT_KINDS))} (or 'none')",
        )
    return frozenset(items)


def _tool_names(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(item.strip().lower() for item in text.split(",") if item.strip()))
    bad = [item for item in items if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", item)]
    if bad:
        raise _Invalid(
            f"not tool names: {', '.join(bad)}",
            "use a comma-separated list of tool names or levels (read, write, admin), or leave it empty",
        )
    return tuple(item for item in items if item not in ("none", "off"))


def _models(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    bad = [item for item in items if any(c.isspace() for c in item)]
    if bad:
        raise _Invalid(
            f"model names cannot contain spaces: {bad!r}", "use a comma-separated list of model names"
        )
    return items


def _model(text: str) -> str:
    if any(c.isspace() for c in text):
        raise _Invalid(f"{text!r} contains whitespace", "use a model name such as gemini-2.5-flash")
    return text


def _discord_token(text: str) -> str:
    # Messages below never include the value: it is a secret.
    if text.lower().startswith("bot "):
        raise _Invalid("starts with 'Bot '", "remove the 'Bot ' prefix; the bot adds it itself")
    if not _BOT_TOKEN_RE.fullmatch(text):
        raise _Invalid(
            "this looks like a client secret or an OAuth token, not the bot token from the Bot page",
            "copy the token from Discord Developer Portal > your application > Bot > Reset Token "
            "(or leave it empty to run against the sandbox)",
        )
    return text


def _gemini_key(text: str) -> str:
    if any(c.isspace() for c in text):
        raise _Invalid(
            "contains whitespace",
            "paste the key from https://aistudio.google.com/apikey exactly, without spaces or line breaks",
        )
    return text


def _admin_token(text: str) -> str:
    if len(text) < 16:
        raise _Invalid(
            f"is too short ({len(text)} characters, at least 16 needed)",
            "generate one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return text


def _text(text: str) -> str:
    return text


def _webhook_url(text: str) -> str:
    # The message never shows the value: the token in it is a secret.
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or not _WEBHOOK_PATH.search(parts.path):
        raise _Invalid(
            "is not a Discord webhook URL (https://discord.com/api/webhooks/<id>/<token>)",
            "copy it from the channel's settings > Integrations > Webhooks > Copy Webhook URL, "
            "or leave it empty",
        )
    return text


def _path(text: str) -> Path:
    return Path(text)


def _database_url(text: str) -> str:
    # The messages never show the value: it may hold a password.
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres"):
        raise _Invalid(
            "is not a postgresql:// URL",
            "write postgresql://USER:PASSWORD@HOST:PORT/DATABASE (leave it empty for SQLite in DATA_DIR)",
        )
    if not parts.path.strip("/"):
        raise _Invalid(
            "names no database", "end it with the database's name: postgresql://USER@HOST:PORT/DATABASE"
        )
    try:
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise _Invalid("has a port that is not a number", "write the port as digits, e.g. :5432") from None
    return text


# Discord's own ceiling is far higher, but a bot that needs thousands of shards needs its own plan.
MAX_SHARDS = 4096
SHARD_AUTO = 0  # SHARD_COUNT=auto: ask Discord (GET /gateway/bot) for its recommendation


def _shard_count(text: str) -> int:
    if text.lower() == "auto":
        return SHARD_AUTO
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= MAX_SHARDS:
        raise _Invalid(
            f"{text!r} is not a shard count",
            f"set the total number of shards of the bot (1 to {MAX_SHARDS}, the same in every process), "
            "'auto' for Discord's recommendation, or leave it empty for one unsharded session",
        )
    return int(text)


def _shard_ids(text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if not re.fullmatch(r"[0-9]+", item)]
    if bad:
        raise _Invalid(
            f"not shard ids: {', '.join(repr(b) for b in bad)}",
            "list this process's shards as comma-separated numbers from 0, e.g. 0,1",
        )
    ids = tuple(int(item) for item in items)
    if len(set(ids)) != len(ids):
        raise _Invalid(f"{text!r} names a shard twice", "list each shard once")
    return tuple(sorted(ids))


def _shard_problems(values: dict[str, Any]) -> list[ConfigProblem]:
    """SHARD_IDS needs a fixed SHARD_COUNT, and each id must be below it."""
    count, ids = values.get("shard_count"), values.get("shard_ids", ())
    if not ids:
        return []
    if count is None or count == SHARD_AUTO:
        return [
            ConfigProblem(
                "SHARD_IDS",
                "is set without a SHARD_COUNT: a shard's guilds depend on the total count",
                "set SHARD_COUNT to the bot's total number of shards (the same in every process)",
            )
        ]
    outside = [i for i in ids if i >= count]
    if outside:
        return [
            ConfigProblem(
                "SHARD_IDS",
                f"names shard {', '.join(map(str, outside))}, "
                f"but SHARD_COUNT={count} has shards 0 to {count - 1}",
                f"use ids from 0 to {count - 1}, or raise SHARD_COUNT",
            )
        ]
    return []


def _host(text: str) -> str:
    if any(c.isspace() for c in text) or "/" in text:
        raise _Invalid(f"{text!r} is not a host name or IP address", "use e.g. 127.0.0.1")
    return text


_PARSERS: dict[str, Callable[[str], Any]] = {
    "discord_token": _discord_token,
    "discord_guild_id": _snowflake,
    "discord_api_base": _url("http", "https"),
    "discord_gateway_url": _url("ws", "wss"),
    "discord_timeout_seconds": _Number(float, 0.5, 300),
    "gemini_api_key": _gemini_key,
    "gemini_model": _model,
    "gemini_fallback_models": _models,
    "gemini_allowed_models": _models,
    # Gemini's range for temperature (GenerationConfig: 0.0 to 2.0 for the 2.x models).
    "gemini_temperature": _Number(float, 0, 2),
    "gemini_safety_threshold": _choice(SAFETY_THRESHOLDS, str.lower),
    "gemini_base_url": _url("http", "https"),
    "gemini_timeout_seconds": _Number(float, 1, 600),
    "gemini_max_output_tokens": _Number(int, 16, 65_536),
    "gemini_tokens_per_second": _Number(float, 1, 100_000),
    "bot_persona": _text,
    "mutex_acquire_timeout_seconds": _Number(float, 0.1, 300),
    "processing_timeout_seconds": _Number(float, 1, 3600),
    "user_rate_limit_per_minute": _Number(int, 1, 10_000),
    "guild_rate_limit_per_minute": _Number(int, 1, 100_000),
    "max_input_chars": _Number(int, 1, 1_000_000),
    "history_max_messages": _Number(int, 0, 1000),
    "history_max_chars": _Number(int, 0, 10_000_000),
    "history_max_tokens": _Number(int, 0, 2_000_000),
    # An answer over this many characters goes as its opening plus answer.md; at least one message.
    "long_answer_chars": _Number(int, 2000, 1_000_000),
    "code_file_chars": _Number(int, 200, 1_000_000),
    "streaming": _bool,
    # Discord lets a channel's messages be edited about 5 times in 5 s: one edit a second per
    # streaming message is the ceiling (DESIGN.md, "Facts for the second wave").
    "stream_edit_interval_seconds": _Number(float, 1, 60),
    "stream_silence_seconds": _Number(float, 1, 600),
    "tools_default": _tool_names,
    "tools_max_rounds": _Number(int, 1, 10),
    "tools_total_seconds": _Number(float, 1, 300),
    "tools_log_payloads": _bool,
    "memory_embedding_model": _model,
    # gemini-embedding-001 gives 128 to 3,072 dimensions (Google recommends 768, 1,536 or 3,072);
    # fewer make the brute-force recall cheaper (services/memory_store.py).
    "memory_embedding_dimensions": _Number(int, 128, 3072),
    "memory_top_k": _Number(int, 1, 50),
    "memory_max_tokens": _Number(int, 50, 100_000),
    "memory_max_items": _Number(int, 10, 100_000),
    "answer_cache": _bool,
    "answer_cache_max_entries": _Number(int, 1, 1_000_000),
    "answer_cache_ttl_seconds": _Number(float, 1, 30 * 86400),
    # 0 turns the context cache off; Gemini's caches live at least a minute.
    "context_cache_ttl_seconds": _Number(float, 0, 7 * 86400),
    # 0 = unlimited.
    "quota_user_tokens_per_day": _Number(int, 0, 10**12),
    "quota_guild_tokens_per_day": _Number(int, 0, 10**12),
    "retry_max_attempts": _Number(int, 1, 20),
    "retry_hint_cap_seconds": _Number(float, 0, 3600),
    "breaker_fail_max": _Number(int, 1, 1000),
    "breaker_reset_seconds": _Number(float, 0.1, 3600),
    "queue_max_attempts": _Number(int, 1, 1000),
    "queue_max_age_seconds": _Number(float, 60, 90 * 86400),
    "queue_drain_per_second": _Number(float, 0.01, 1000),
    "maintenance_queue_messages": _bool,
    "shutdown_grace_seconds": _Number(float, 0, 600),
    "data_dir": _path,
    # The DataStore keeps at least one timestamped copy besides the .bak (it refuses 0).
    "backup_keep": _Number(int, 1, 10_000),
    "queue_max_items": _Number(int, 1, 10_000_000),
    "queue_max_pending_per_user": _Number(int, 1, 10_000),
    "queue_max_pending_per_guild": _Number(int, 1, 1_000_000),
    "queue_retention_seconds": _Number(float, 0, 3650 * 86400),
    "history_retention_seconds": _Number(float, 3600, 3650 * 86400),
    "database_url": _database_url,
    # Connections each process keeps to PostgreSQL (besides one for notifications): mind the
    # server's max_connections (100 by default) across all processes.
    "database_pool_size": _Number(int, 2, 100),
    "shard_count": _shard_count,
    "shard_ids": _shard_ids,
    # Discord's own upload limit is 10 MiB (500 MiB with Nitro); Gemini takes up to 2 GB per file.
    "attachment_max_file_bytes": _Number(int, 1, 2 * 1024**3),
    "attachment_max_message_bytes": _Number(int, 1, 20 * 1024**3),
    "attachment_max_count": _Number(int, 0, 10),
    "attachment_types": _attachment_kinds,
    "attachment_spool_max_bytes": _Number(int, 0, 1024**4),
    # Gemini refuses a request over 20 MB, and inline bytes travel base64-encoded (4/3 of their size).
    "gemini_inline_max_bytes": _Number(int, 0, 14 * 1024 * 1024),
    "http_host": _host,
    "http_port": _Number(int, 0, 65535),
    "admin_api_token": _admin_token,
    "admin_user_ids": _user_ids,
    "log_level": _choice(LOG_LEVELS, str.upper),
    "log_format": _choice(LOG_FORMATS, str.lower),
    "log_payloads": _bool,
    "trace_slow_seconds": _Number(float, 0.01, 3600),
    "otel_exporter_otlp_endpoint": _url("http", "https"),
    "health_interval_seconds": _Number(float, 0.1, 3600),
    "degraded_queue_age_seconds": _Number(float, 1, 7 * 86400),
    "alert_channel_id": _snowflake,
    "alert_webhook_url": _webhook_url,
    "alert_dm_owners": _bool,
    "alert_repeat_seconds": _Number(float, 60, 7 * 86400),
    "alert_breaker_open_seconds": _Number(float, 0, 86400),
    "alert_queue_age_seconds": _Number(float, 1, 7 * 86400),
    "alert_dead_letters_per_hour": _Number(int, 1, 1_000_000),
    "alert_memory_mb": _Number(int, 16, 1_000_000),
    "alert_error_rate": _Number(float, 0.001, 1),
    "availability_slo": _Number(float, 0.5, 0.99999),
    "plugins_dir": _path,
    "plugins": _plugin_names_or_all,
    "required_plugins": _plugin_name_set,
    "plugin_load_timeout_seconds": _Number(float, 0.1, 600),
    "command_sync_interval_seconds": _Number(float, 0, 3600),
    "self_modify": _bool,
    "self_modify_test_timeout_seconds": _Number(float, 1, 3600),
    "heal_enabled": _bool,
    "heal_max_actions_per_hour": _Number(int, 1, 60),
    # discord.py itself reconnects after 60 s without a frame: the healer only helps below that.
    "heal_gateway_silence_seconds": _Number(float, 1, 55),
    "heal_memory_mb": _Number(int, 1, 1_000_000),
}

SETTING_NAMES: tuple[str, ...] = tuple(name.upper() for name in _PARSERS)


def _model_problems(values: dict[str, Any]) -> list[ConfigProblem]:
    """GEMINI_ALLOWED_MODELS, when set, must hold the default chain, and the chain stays small."""
    allowed = values.get("gemini_allowed_models", ())
    chain = (values.get("gemini_model", Config.gemini_model), *values.get("gemini_fallback_models", ()))
    found = []
    missing = [m for m in dict.fromkeys(chain) if allowed and m not in allowed]
    if missing:
        found.append(
            ConfigProblem(
                "GEMINI_ALLOWED_MODELS",
                f"does not list {', '.join(missing)} (GEMINI_MODEL / GEMINI_FALLBACK_MODELS), which the bot "
                "uses by default",
                f"add {', '.join(missing)} to it, or leave it empty (then only the default chain is allowed)",
            )
        )
    if len(dict.fromkeys((*chain, *allowed))) > MAX_ALLOWED_MODELS:
        found.append(
            ConfigProblem(
                "GEMINI_ALLOWED_MODELS",
                f"names more than {MAX_ALLOWED_MODELS} models (with GEMINI_MODEL and GEMINI_FALLBACK_MODELS)",
                f"keep at most {MAX_ALLOWED_MODELS}: each has a breaker, and /model lists them all",
            )
        )
    return found


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _mode(path: Path) -> int | None:
    """The permission bits of ``path``, or None when it cannot be looked at."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _permission_warnings(env_file: Path | None, data_dir: Path) -> list[ConfigProblem]:
    """Warnings for an env file other users can read and a data directory they can enter.

    Only a warning, never a chmod: a shared group or a backup agent may need that access on
    purpose. The bot creates a missing data directory with mode 0700 itself.
    """
    found: list[ConfigProblem] = []
    mode = None if env_file is None else _mode(env_file)
    if env_file is not None and mode is not None and mode & 0o044:
        found.append(
            ConfigProblem(
                str(env_file),
                f"can be read by other users of this machine (mode {mode:04o}), and it is where the "
                "bot's tokens go",
                f"chmod 600 {shlex.quote(str(env_file))}",
            )
        )
    mode = _mode(data_dir)
    if mode is not None and data_dir.is_dir() and mode & 0o077:
        found.append(
            ConfigProblem(
                "DATA_DIR",
                f"{data_dir} is open to other users of this machine (mode {mode:04o}); it holds the "
                "conversation history and the queue",
                f"chmod 700 {shlex.quote(str(data_dir))} (the bot never changes the mode of an "
                "existing directory)",
            )
        )
    return found


def _otel_installed() -> bool:
    """Whether the [otel] extra's packages can be imported (without importing them)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
        )
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _read_env_file(path: Path) -> dict[str, str | None]:
    # interpolate=False: ${VAR} would otherwise be expanded from os.environ, not from `environ`.
    return dict(dotenv_values(path, interpolate=False))


def load_config(environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> Config:
    """Load and validate the configuration.

    Values come from ``env_file`` (read without touching ``os.environ``; a missing file is
    fine) overlaid by ``environ`` (default ``os.environ``): the real environment wins. An
    empty value means "not set" and takes the default. Raises ``ConfigError`` with every
    problem at once.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []
    warnings: list[ConfigProblem] = []
    merged: dict[str, str] = {}

    if env_file is not None and env_file.exists():
        try:
            file_values = _read_env_file(env_file)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(
                ConfigProblem(
                    str(env_file), f"cannot be read ({type(exc).__name__})", "fix or remove the file"
                )
            )
            file_values = {}
        known = set(SETTING_NAMES)
        for key, value in file_values.items():
            if key not in known:
                warnings.append(
                    ConfigProblem(
                        key, f"is not a known setting (in {env_file})", "check the name against .env.example"
                    )
                )
            if value is not None:
                merged[key] = value
    merged.update({name: env[name] for name in SETTING_NAMES if name in env})

    values: dict[str, Any] = {}
    for attr, parse in _PARSERS.items():
        raw = merged.get(attr.upper(), "").strip()
        if not raw:
            continue  # unset or empty: the dataclass default applies
        try:
            values[attr] = parse(raw)
        except _Invalid as exc:
            problems.append(ConfigProblem(attr.upper(), exc.problem, exc.fix))

    host = values.get("http_host", Config.http_host)
    if not _is_loopback(host):
        if not merged.get("ADMIN_API_TOKEN", "").strip():  # (an invalid token is a problem already)
            problems.append(
                ConfigProblem(
                    "HTTP_HOST",
                    f"{host} is not a loopback address and ADMIN_API_TOKEN is not set: the HTTP API "
                    "would face the network with no credential at all",
                    "keep HTTP_HOST=127.0.0.1, or set ADMIN_API_TOKEN (python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))') and expose the port only on a private network",
                )
            )
        else:
            warnings.append(
                ConfigProblem(
                    "HTTP_HOST",
                    f"{host} is not a loopback address: the health/admin/metrics API is open to the network",
                    "keep 127.0.0.1 unless a reverse proxy with TLS and access control sits in front",
                )
            )

    problems += _model_problems(values)
    problems += _shard_problems(values)

    if values.get("otel_exporter_otlp_endpoint") and not _otel_installed():
        problems.append(
            ConfigProblem(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "is set but OpenTelemetry (the [otel] extra) is not installed",
                "pip install -e '.[otel]' (opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http), "
                "or leave it empty",
            )
        )

    if problems:
        raise ConfigError(problems)
    warnings += _permission_warnings(env_file, values.get("data_dir", Config.data_dir))
    config = Config(**values, warnings=tuple(warnings))
    if config.gemini_timeout_floor() > config.gemini_timeout_seconds:
        warnings.append(
            ConfigProblem(
                "GEMINI_TIMEOUT_SECONDS",
                f"{config.gemini_timeout_seconds:g} s is shorter than the "
                f"{config.gemini_timeout_floor():.1f} s a {config.gemini_max_output_tokens}-token answer "
                f"(GEMINI_MAX_OUTPUT_TOKENS) takes at {config.gemini_tokens_per_second:g} tokens/s "
                "(GEMINI_TOKENS_PER_SECOND): long answers will time out",
                "raise GEMINI_TIMEOUT_SECONDS (and PROCESSING_TIMEOUT_SECONDS) or lower "
                "GEMINI_MAX_OUTPUT_TOKENS",
            )
        )
        config = replace(config, warnings=tuple(warnings))
    return config
