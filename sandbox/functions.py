"""Function calling as the emulated Gemini does it: deterministic calls, the real API's shape checks.

The real API (https://ai.google.dev/gemini-api/docs/function-calling, REST ``Tool.functionDeclarations``,
``ToolConfig.functionCallingConfig``): a request declares functions in a ``Tool`` of their own; the
model answers with ``functionCall`` parts (``name``, ``args``, sometimes an ``id``); the caller sends the
model's turn back unchanged, then one user turn holding a ``functionResponse`` part (``name``,
``response``, the call's ``id``) for each call, in order (google-genai's own loop does exactly that,
``Content(role='user', parts=function_response_parts)`` in ``models.py``). A request that breaks this
is refused with 400 INVALID_ARGUMENT and the sentences Gemini uses ("Please ensure that the number of
function response parts is equal to the number of function call parts of the function call turn.").
Mode ``NONE`` means the model calls nothing.

The emulated model calls functions when the question says so:

- ``use tools: a, b, c``: one call per round, in that order, then an answer naming each result;
- ``use tools together: a, b``: all calls in one round (parallel calls);
- ``use tools forever: a``: calls ``a`` every round (until mode NONE: the caller's round cap).

A name may carry JSON arguments: ``react{"emoji": "👍"}``. Only declared functions are called (a model
cannot call what it was not offered); an undeclared name is skipped.
"""

from __future__ import annotations

import json
import re
from typing import Any

_TRIGGER = re.compile(r"use tools(?P<how> together| forever)?:\s*(?P<names>.+)", re.IGNORECASE | re.DOTALL)
_CALL = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<args>\{[^{}]*\})?")
COUNT_MISMATCH = ("Please ensure that the number of function response parts is equal to the number of "
                  "function call parts of the function call turn.")
CALL_PLACEMENT = ("Please ensure that function call turn comes immediately after a user turn or after a "
                  "function response turn.")
RESPONSE_PLACEMENT = ("Please ensure that function response turn comes immediately after a function call "
                      "turn.")


def declared(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The functions a request declares, by name."""
    found: dict[str, dict[str, Any]] = {}
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            for decl in tool.get("functionDeclarations") or []:
                if isinstance(decl, dict) and isinstance(decl.get("name"), str):
                    found[decl["name"]] = decl
    return found


def mode(body: dict[str, Any]) -> str:
    """The request's function calling mode (``AUTO`` unless ``toolConfig`` says otherwise)."""
    config = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {})
    return str(config.get("mode") or "AUTO").upper()


def _calls(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["functionCall"] for p in content.get("parts") or []
            if isinstance(p, dict) and "functionCall" in p]


def _responses(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["functionResponse"] for p in content.get("parts") or []
            if isinstance(p, dict) and "functionResponse" in p]


def turn_problem(body: dict[str, Any]) -> str | None:
    """What the real API says about the request's function call and response turns, or None."""
    contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
    for n, content in enumerate(contents):
        calls, responses = _calls(content), _responses(content)
        if calls:
            if content.get("role") != "model":
                return f"* GenerateContentRequest.contents[{n}]: function calls come from the model"
            if n == 0 or contents[n - 1].get("role") != "user":
                return CALL_PLACEMENT
            after = contents[n + 1] if n + 1 < len(contents) else None
            answered = _responses(after) if after is not None else []
            if after is None or after.get("role") not in ("user", "function") or len(answered) != len(calls):
                return COUNT_MISMATCH
            for call, response in zip(calls, answered, strict=True):
                if response.get("name") != call.get("name"):
                    return (f"* GenerateContentRequest.contents[{n + 1}]: function response name "
                            f"{response.get('name')!r} does not match the call {call.get('name')!r}")
                if call.get("id") and response.get("id") != call.get("id"):
                    return f"* GenerateContentRequest.contents[{n + 1}]: function response id does not match"
                if not isinstance(response.get("response"), dict):
                    return f"* GenerateContentRequest.contents[{n + 1}].parts: response must be an object"
        if responses and (n == 0 or not _calls(contents[n - 1])):
            return RESPONSE_PLACEMENT
    return None


def question(body: dict[str, Any]) -> str:
    """The text of the last user turn that has text (the question, not a function response turn)."""
    for content in reversed([c for c in body.get("contents") or [] if isinstance(c, dict)]):
        if content.get("role", "user") == "user":
            text = "".join(str(p.get("text", "")) for p in content.get("parts") or [] if isinstance(p, dict))
            if text:
                return text
    return ""


def answered(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The function responses sent since the question, in order."""
    contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
    out: list[dict[str, Any]] = []
    for content in reversed(contents):
        responses = _responses(content)
        if not responses and not _calls(content):
            break
        out[:0] = responses
    return out


def plan(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ``functionCall`` parts the model answers with, or None (answer in words)."""
    offered = declared(body)
    if not offered or mode(body) == "NONE":
        return None
    found = _TRIGGER.search(question(body))
    if found is None:
        return None
    wanted: list[tuple[str, dict[str, Any]]] = []
    for match in _CALL.finditer(found["names"].split("\n")[0]):
        name = match["name"]
        try:
            args = json.loads(match["args"]) if match["args"] else {}
        except ValueError:
            args = {}
        if name in offered:
            wanted.append((name, args))
    if not wanted:
        return None
    done = answered(body)
    how = (found["how"] or "").strip().lower()
    if how == "forever":
        name, args = wanted[0]
        return [_call(name, args, len(done))]
    if how == "together":
        return None if done else [_call(name, args, n) for n, (name, args) in enumerate(wanted)]
    if len(done) >= len(wanted):
        return None
    name, args = wanted[len(done)]
    return [_call(name, args, len(done))]


def _call(name: str, args: dict[str, Any], n: int) -> dict[str, Any]:
    return {"functionCall": {"name": name, "args": args, "id": f"call-{n + 1}"}}


def summary(body: dict[str, Any]) -> str | None:
    """The answer after function calls: each result in a few words; None when no function was called."""
    done = answered(body)
    if not done:
        return None
    lines = []
    for response in done:
        result = response.get("response") or {}
        if "error" in result:
            lines.append(f"- {response.get('name')} failed: {result['error']}")
        else:
            text = json.dumps(result.get("result", result), ensure_ascii=False)
            lines.append(f"- {response.get('name')}: {text[:200]}")
    # Told to stop (mode NONE) while it still wanted to call: the answer says so.
    wanted_more = mode(body) == "NONE" and plan({**body, "toolConfig": {}}) is not None
    stopped = " (I was asked to stop calling functions)" if wanted_more else ""
    return f"I called {len(done)} function(s){stopped}:\n" + "\n".join(lines)
