"""Structured logging for the whole process, with secrets redacted everywhere.

``configure_logging()`` is called once by ``main()``. structlog loggers and stdlib loggers
(discord.py, google-genai, aiohttp) end in the same handler, so both get the same
context fields (``trace_id``, ``guild``... bound with ``structlog.contextvars``), the same
format (JSON lines or a readable console) and the same redaction.

At DEBUG, discord.py logs whole gateway events and HTTP bodies, which hold what users wrote.
Unless ``log_payloads`` is set (``LOG_PAYLOADS=1``), those values are replaced by a marker in
its DEBUG lines; the lines themselves (event names, routes, statuses) stay.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

REDACTED = "<redacted>"

# Shorter "secrets" are not worth redacting: replacing every "ab" would wreck the log.
_MIN_SECRET_LEN = 4

# Shapes of credentials worth hiding even when nobody configured them as secrets, in one
# regex so that a string is scanned once. Named groups keep the text before the credential.
_SHAPES = re.compile(
    "|".join(
        (
            # Discord bot token: base64url user id . timestamp . HMAC. The lookbehind lets a
            # match start only at the beginning of a run, keeping long base64 blobs linear.
            r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}",
            # Google API key.
            r"AIza[0-9A-Za-z_-]{35}",
            r"(?P<bearer>\b(?i:bearer)\s+)[A-Za-z0-9._~+/=-]{8,}",
            # key=... (and friends) in URLs and query strings.
            r"(?P<query>[?&;](?i:key|api_key|apikey|token|access_token)=)[^&\s#'\"]+",
            # An interaction token in a Discord URL (discord.py's DEBUG lines show the URL): it
            # answers for the bot for 15 minutes.
            r"(?P<path>/(?:interactions|webhooks)/[0-9]+/)[A-Za-z0-9_.-]{16,}",
        )
    )
)


def _shape_replacement(match: re.Match[str]) -> str:
    return (match.group("bearer") or match.group("query") or match.group("path") or "") + REDACTED


# Values of event-dict keys with these names are hidden whole, whatever they look like.
_SECRET_KEYS = frozenset(
    {"token", "api_key", "apikey", "authorization", "password", "secret", "x-goog-api-key", "admin_api_token"}
)

_HANDLER_MARK = "_gemini_bot_handler"

PAYLOAD_HIDDEN = "<payload hidden: LOG_PAYLOADS=1 logs it>"


class Redactor:
    """A structlog processor that hides secrets in every string of the event dict.

    It replaces the configured ``secrets`` and anything shaped like a Discord bot token, a
    Google API key, ``Bearer <token>`` or ``key=...`` in a URL, in the message, in nested
    dicts/lists, in the rendered exception text, and in the ``repr`` of other objects.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        kept = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = re.compile("|".join(re.escape(s) for s in kept)) if kept else None

    def redact(self, text: str) -> str:
        """Return ``text`` with every secret and credential-shaped substring replaced."""
        # Configured secrets first: a shape match could otherwise swallow half of one.
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        return _SHAPES.sub(_shape_replacement, text)

    def _value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth > 8:  # a cycle or an absurd nesting: render it as text rather than recurse
            return self.redact(repr(value))
        if isinstance(value, Mapping):
            return {k: self._keyed(k, v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._value(v, depth + 1) for v in value]
        if isinstance(value, bytes):
            return self.redact(value.decode("utf-8", "replace"))
        # Other objects (exceptions, URLs, models) are rendered with repr() by the renderers.
        text = repr(value)
        cleaned = self.redact(text)
        return value if cleaned == text else cleaned

    def _keyed(self, key: Any, value: Any, depth: int) -> Any:
        if isinstance(key, str) and key.lower() in _SECRET_KEYS and isinstance(value, str) and value:
            return REDACTED
        return self._value(value, depth)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        return {k: v if k.startswith("_") else self._keyed(k, v, 0) for k, v in event_dict.items()}


def _shared_processors() -> list[Processor]:
    """Processors run on every event before the formatter, for structlog and stdlib records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    level: str = "INFO",
    fmt: str = "console",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    *,
    log_payloads: bool = False,
    handler: logging.StreamHandler[Any] | None = None,
) -> None:
    """Route structlog and stdlib logging to one redacting handler on ``stream`` (default stderr).

    ``fmt`` is ``"json"`` (one JSON object per line) or ``"console"``. Without
    ``log_payloads``, the payloads in discord.py's DEBUG lines (users' messages) are hidden.
    ``handler`` replaces the stream handler (e.g. a ``RotatingFileHandler``; it is closed when
    replaced). Calling it again replaces the handler it installed before; it never stacks handlers.
    """
    if handler is None:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        isatty = getattr(handler.stream, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Render exceptions to text here so that the redactor sees the traceback.
            structlog.processors.format_exc_info,
            Redactor(secrets),
            renderer,
        ],
    )
    handler.setFormatter(formatter)
    handler.addFilter(_quiet_reconnects)
    if not log_payloads:
        handler.addFilter(_hide_payloads)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a reconfiguration (tests, a level change) reaches loggers already handed out.
        cache_logger_on_first_use=False,
    )


def _quiet_reconnects(record: logging.LogRecord) -> bool:
    """discord.py logs every gateway reconnect attempt at ERROR with a full traceback; keep one
    warning line.

    The exception stays in the line (type and message), so nothing is hidden, but a flapping
    network does not fill the log (or an operator's terminal) with stacks, and a gateway that is
    unreachable for a while (an outage discord.py rides out by retrying) is no error to page for.
    """
    if record.exc_info and record.name.startswith("discord.") and record.getMessage().startswith(
        "Attempting a reconnect"
    ):
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
    return True


def _hide_payloads(record: logging.LogRecord) -> bool:
    """Replace the payload arguments of discord.py's DEBUG lines with ``PAYLOAD_HIDDEN``.

    discord.py passes gateway events and response bodies as dicts and lists, request bodies as
    JSON text or form data. Rather than list its message formats (which change between
    releases), every argument that is not a plain scalar (a number, a flag, an enum, a text
    that is not JSON) is hidden.
    """
    if record.levelno >= logging.INFO or not record.name.startswith("discord.") or not record.args:
        return True
    if isinstance(record.args, Mapping):
        # logging turns a lone dict argument into ``args`` itself: "%s" then renders it whole.
        if "%(" in str(record.msg):
            record.args = {k: _hidden_unless_scalar(v) for k, v in record.args.items()}
        else:
            record.args = (PAYLOAD_HIDDEN,)
    else:
        record.args = tuple(_hidden_unless_scalar(arg) for arg in record.args)
    return True


def _hidden_unless_scalar(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | enum.Enum):
        return value
    if isinstance(value, str) and not value.lstrip().startswith(("{", "[")):
        return value
    return PAYLOAD_HIDDEN
