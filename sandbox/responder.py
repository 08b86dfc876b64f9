"""Deterministic, offline replies for the Gemini emulator.

The responder reads a ``generateContent`` request body (``contents`` plus an optional
``systemInstruction``) and answers without any model: canned answers to a few prompts,
exact-length replies for testing message splitting, a fenced code block on request, and
otherwise an echo that shows how much context the emulator received.
"""

from __future__ import annotations

import re
from typing import Any

_LENGTH_RE = re.compile(r"reply with (\d+) char", re.IGNORECASE)
_WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
          "labore et dolore magna aliqua").split()
# Cap requested lengths so a typo cannot make the emulator build a gigabyte string.
MAX_LENGTH = 100_000

CANNED = {
    "hello": "Hello! I am the sandbox Gemini. Ask me anything; I answer deterministically.",
    "hi": "Hello! I am the sandbox Gemini. Ask me anything; I answer deterministically.",
    "help": ("I am an offline stand-in for Gemini. Try: 'reply with 2500 characters', 'write code', "
             "'who are you', or any message to see it echoed with its context."),
    "what are you": "I am a loopback emulator of the Gemini API, used for tests and rehearsals.",
}


def text_of(content: dict[str, Any] | None) -> str:
    """Join the text parts of one ``Content`` dict."""
    if not content:
        return ""
    return "".join(str(p.get("text", "")) for p in content.get("parts", []) if isinstance(p, dict))


def words_of_length(n: int) -> str:
    """Return exactly ``n`` characters of space-separated words (no leading/trailing space)."""
    n = max(0, min(n, MAX_LENGTH))
    out: list[str] = []
    size = 0
    i = 0
    while size < n:
        word = _WORDS[i % len(_WORDS)]
        i += 1
        sep = 1 if out else 0
        room = n - size - sep
        if room <= 0:
            break
        if len(word) > room:
            word = word[:room]
        out.append(word)
        size += sep + len(word)
    text = " ".join(out)
    # A trailing space may be needed when the last room was exactly one separator.
    return text.ljust(n, ".")


def reply(body: dict[str, Any]) -> str:
    """Return the emulator's answer to a ``generateContent`` request body."""
    contents = [c for c in body.get("contents", []) if isinstance(c, dict)]
    user_turns = [c for c in contents if c.get("role", "user") == "user"]
    last = text_of(user_turns[-1]) if user_turns else ""
    earlier = len(contents) - 1 if contents else 0
    prompt = last.strip().lower().rstrip("?!. ")

    if prompt in CANNED:
        return CANNED[prompt]
    if match := _LENGTH_RE.search(last):
        if "code" in prompt:
            return prose_and_code(int(match.group(1)))
        return words_of_length(int(match.group(1)))
    if "code block" in prompt or "write code" in prompt:
        return ("Here is some code:\n```python\ndef greet(name: str) -> str:\n"
                "    return f\"Hello, {name}!\"\n```\nThat is all.")
    if "who are you" in prompt:
        system = text_of(body.get("systemInstruction")).strip()
        if system:
            return f"I follow my system instruction: «{system}»"
        return "I am the sandbox Gemini, and I was given no system instruction."
    return f"Echo (saw {earlier} earlier turns): «{last}»"


def prose_and_code(n: int) -> str:
    """About ``n`` characters alternating prose and fenced Python blocks (for splitting tests)."""
    n = max(0, min(n, MAX_LENGTH))
    parts: list[str] = []
    size = 0
    block = 0
    while size < n:
        prose = words_of_length(300)
        code = "\n".join(f"value_{block}_{i} = {i} * 2  # line {i} of block {block}" for i in range(30))
        part = f"{prose}\n```python\n{code}\n```"
        parts.append(part)
        size += len(part) + 1
        block += 1
    return "\n".join(parts)


def count_tokens(text: str) -> int:
    """Approximate tokens like the real API's rule of thumb (about four characters each)."""
    return max(1, (len(text) + 3) // 4) if text else 0
