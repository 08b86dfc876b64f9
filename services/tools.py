"""Functions the model may call: a registry of tools, each run behind its own breaker and timeout.

Gemini's function calling, with the loop in our hands (``GeminiService`` runs it, automatic function
calling off): Gemini answers with ``functionCall`` parts, the bot runs each call here, and sends the
results back as ``functionResponse`` parts for the next round. So every call goes through the runtime:

- ``Tool``: a name, a description and a JSON schema of its arguments (sent to Gemini as a
  ``FunctionDeclaration``), a ``Safety`` level (``read``, ``write``, ``admin``; ``destructive`` ones
  are only proposed, a person confirms them), a timeout, and the coroutine that does the work;
- ``ToolRegistry``: ``register(tool)`` (a plugin may add its own), a breaker per tool on the
  application's board (``tool:<name>``), and ``run``: arguments checked against the schema, the call
  under ``breaker -> timeout``, logged (tool, outcome, seconds; never arguments or results, which may
  hold what users wrote) and counted (``bot_tool_calls_total{tool,outcome}``). A failing, hanging or
  refused call never raises: it returns an error result for the model (``{"error": ...}``), so the
  answer goes on without it.

What a tool may touch is decided by the caller (``bot.tools``): the guild's setting, the invoker's
permissions, and the at-most-once record of write calls.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import structlog
from google.genai import types

from resilience.breakers import Breaker, BreakerBoard
from resilience.clock import Clock
from resilience.errors import CallTimeoutError, CircuitOpenError, classify
from services.metrics import Metrics

log = structlog.get_logger("services.tools")

BREAKER_PREFIX = "tool:"
MAX_TOOLS = 64
"""Tools one registry holds at most (their names are metric labels: a bounded set)."""
DEFAULT_TIMEOUT = 5.0
MAX_RESULT_CHARS = 8_000
"""A result longer than this (as JSON-ish text) is cut, so one tool cannot flood the prompt."""
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class Safety(StrEnum):
    """What a tool may do: read (look things up), write (change something small and visible),
    admin (moderation; offered only where the guild enables it and the invoker is a manager)."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class ToolError(Exception):
    """A tool could not do what was asked; the message is one sentence for the model."""


Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]
"""A tool's work: ``handler(context, arguments)`` -> a JSON-able result. ``context`` is what the
caller passes (``bot.tools.ToolContext``)."""


@dataclass(frozen=True, slots=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str
    handler: Handler
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    safety: Safety = Safety.READ
    timeout: float = DEFAULT_TIMEOUT
    destructive: bool = False
    """Proposed to a person (a confirmation button) instead of done; admin tools only."""

    def declaration(self) -> types.FunctionDeclarationDict:
        """The ``FunctionDeclaration`` Gemini gets (its arguments as a JSON schema)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters_json_schema": dict(self.parameters),
        }


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """One call the model asked for: ``id`` is Gemini's when it sends one (echoed in the response)."""

    name: str
    args: dict[str, Any]
    id: str | None = None


class FunctionCaller(Protocol):
    """What ``GeminiService`` needs to run a manual function-calling loop for one answer."""

    max_rounds: int
    """Rounds of function calls at most; then Gemini must answer in words (mode NONE)."""
    seconds: float
    """The loop's total time cap; past it, the next round is the last (mode NONE)."""

    def declarations(self) -> list[types.FunctionDeclarationDict]:
        """The functions offered (none: no loop)."""

    async def call(self, call: FunctionCall) -> dict[str, Any]:
        """Run one call; never raises (an error result for the model instead), but for cancellation."""


def check_arguments(schema: Mapping[str, Any], args: Mapping[str, Any]) -> str | None:
    """What is wrong with ``args`` for an object ``schema`` (required, unknown, top-level types), or None."""
    properties: Mapping[str, Any] = schema.get("properties") or {}
    missing = [name for name in schema.get("required") or () if name not in args]
    if missing:
        return f"missing argument(s): {', '.join(missing)}"
    unknown = sorted(set(args) - set(properties))
    if unknown and schema.get("additionalProperties") is not True:
        return f"unknown argument(s): {', '.join(unknown)}"
    for name, value in args.items():
        spec = properties.get(name) or {}
        kinds = _JSON_TYPES.get(str(spec.get("type", "")).lower())
        if kinds is None:
            continue
        integral = isinstance(value, float) and value.is_integer() and spec.get("type") == "integer"
        if (not isinstance(value, kinds) and not integral) or (isinstance(value, bool) and bool not in kinds):
            return f"argument {name!r} must be of type {spec.get('type')}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {name!r} must be one of {spec['enum']}"
        low, high = spec.get("minimum"), spec.get("maximum")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if (low is not None and value < low) or (high is not None and value > high):
                return f"argument {name!r} must be from {low} to {high}"
    return None


class ToolRegistry:
    """The tools the model may call, by name; built once per application (``app.tools``).

    ``register`` adds a tool (and its breaker ``tool:<name>`` on ``board``); ``run`` calls one.
    """

    def __init__(self, board: BreakerBoard, *, clock: Clock, metrics: Metrics | None = None) -> None:
        self._board = board
        self._clock = clock
        self._metrics = metrics
        self._tools: dict[str, Tool] = {}
        self._breakers: dict[str, Breaker] = {}

    def register(self, tool: Tool) -> Tool:
        """Add ``tool``; ``ValueError`` for a bad or taken name, a bad timeout, a destructive tool
        that is not admin, or a full registry. Returns the tool (usable as a decorator's result)."""
        if not _NAME.fullmatch(tool.name):
            raise ValueError(f"tool name {tool.name!r}: lower-case letters, digits and _, at most 64")
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        if len(self._tools) >= MAX_TOOLS:
            raise ValueError(f"at most {MAX_TOOLS} tools")
        if not 0 < tool.timeout <= 60:
            raise ValueError(f"tool {tool.name!r}: timeout must be from 0 to 60 seconds")
        if tool.destructive and tool.safety is not Safety.ADMIN:
            raise ValueError(f"tool {tool.name!r}: only admin tools can be destructive")
        if str(tool.parameters.get("type", "object")).lower() != "object":
            raise ValueError(f"tool {tool.name!r}: parameters must be an object schema")
        name = BREAKER_PREFIX + tool.name
        breaker = self._board.get(name) if name in self._board else self._board.add(name)
        self._tools[tool.name] = tool
        self._breakers[tool.name] = breaker
        return tool

    def unregister(self, name: str) -> None:
        """Remove a tool (a plugin unloaded); its breaker stays on the board. Unknown names are ignored."""
        self._tools.pop(name, None)
        self._breakers.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def breaker(self, name: str) -> Breaker:
        return self._breakers[name]

    async def run(self, tool: Tool, args: Mapping[str, Any], context: Any) -> dict[str, Any]:
        """Run ``tool`` with ``args`` behind its breaker and timeout; the result for the model.

        ``{"result": ...}`` on success, ``{"error": sentence}`` otherwise (bad arguments, a
        ``ToolError``, a timeout, an open breaker, any failure). Never raises but for cancellation.
        """
        problem = check_arguments(tool.parameters, args)
        if problem is not None:
            self.observe(tool.name, "invalid", 0.0)
            return {"error": f"{tool.name}: {problem}"}
        started = self._clock.monotonic()
        try:
            breaker = self._breakers[tool.name]
            result = await breaker.call(tool.handler, context, dict(args), timeout=tool.timeout)
        except asyncio.CancelledError:
            raise
        except ToolError as exc:
            return self._failed(tool, "refused", started, str(exc))
        except CallTimeoutError:
            sentence = f"{tool.name} did not answer within {tool.timeout:g} s"
            return self._failed(tool, "timeout", started, sentence)
        except CircuitOpenError:
            return self._failed(tool, "open", started, f"{tool.name} is failing and paused; try without it")
        except Exception as exc:
            verdict = classify(exc)
            log.warning(
                "tool.failed", tool=tool.name, category=verdict.category.value, error=type(exc).__name__
            )
            return self._failed(tool, "error", started, f"{tool.name} failed ({verdict.category.value})")
        self.observe(tool.name, "ok", self._clock.monotonic() - started)
        return {"result": _bounded(result)}

    def _failed(self, tool: Tool, outcome: str, started: float, sentence: str) -> dict[str, Any]:
        self.observe(tool.name, outcome, self._clock.monotonic() - started)
        return {"error": sentence}

    def observe(self, name: str, outcome: str, seconds: float) -> None:
        """Count one call (``name`` is a registered tool's, else ``"unknown"``) and log it."""
        label = name if name in self._tools else "unknown"
        log.info("tool.call", tool=label, outcome=outcome, seconds=round(max(0.0, seconds), 4))
        if self._metrics is not None:
            self._metrics.observe_tool(label, outcome, max(0.0, seconds))


def _bounded(result: Any) -> Any:
    """``result``, or its text cut to ``MAX_RESULT_CHARS`` when it is longer."""
    text = result if isinstance(result, str) else None
    if text is None:
        try:
            import json

            text = json.dumps(result, default=str)
        except (TypeError, ValueError):
            text = str(result)
        if len(text) <= MAX_RESULT_CHARS:
            return result
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[:MAX_RESULT_CHARS] + " [cut]"
