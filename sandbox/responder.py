"""Deterministic, offline replies for the Gemini emulator.

The responder reads a ``generateContent`` request body (``contents`` plus an optional
``systemInstruction``) and answers without any model: canned answers to a few prompts,
exact-length replies for testing message splitting, a fenced code block on request, and
otherwise an echo that shows how much context the emulator received.
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Callable
from typing import Any

_LENGTH_RE = re.compile(r"reply with (\d+) char", re.IGNORECASE)
_EXACT_CODE_RE = re.compile(r"reply with exactly (\d+) characters of code", re.IGNORECASE)
# A request to change a file (the bot's /admin propose): the current file in a fence, the change in
# words. The emulator edits deterministically, by the verbs of ``edit_file``.
_FILE_CHANGE_RE = re.compile(
    r"Change requested: (?P<change>.*?)\n.*?Current file:\n```python\n(?P<body>.*)```", re.DOTALL
)
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_EDIT_RE = re.compile(rf"(replace|add line|prepend line)\s+{_QUOTED}(?:\s+with\s+{_QUOTED})?")
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


# A turn of a shared conversation may start with who wrote it, "Name (<@id>): " (how a Discord bot
# tells a model the people of a channel apart); the emulated model reads it as a model would: as
# who is speaking, not as part of the question.
SPEAKER = re.compile(r"^(?P<name>[^\n:()<>]{1,60}) \(<@(?P<id>\d{1,20})>\): ")


# What a bot recalls from its long-term memory may come before the question, in <memory> tags (the
# bot's semantic memory does so): the emulated model reads it as context, not as the question.
MEMORY_BLOCK = re.compile(r"^<memory>.*?</memory>\s*", re.S)


def split_speaker(text: str) -> tuple[str | None, str]:
    """``("Name (<@id>)", rest)`` for a text that starts with a speaker label, else ``(None, text)``
    (a leading ``<memory>`` block is left out of both)."""
    text = MEMORY_BLOCK.sub("", text, count=1)
    found = SPEAKER.match(text)
    if found is None:
        return None, text
    return f"{found['name']} (<@{found['id']}>)", text[found.end():]


def said(content: dict[str, Any] | None) -> str:
    """The text of one ``Content`` without the speaker labels its parts start with."""
    if not content:
        return ""
    return "".join(split_speaker(str(p.get("text", "")))[1]
                   for p in content.get("parts", []) if isinstance(p, dict))


def speakers(content: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(speaker, text)`` for each labelled text part of one ``Content``."""
    found = []
    for part in (content or {}).get("parts", []):
        if isinstance(part, dict):
            who, text = split_speaker(str(part.get("text", "")))
            if who is not None:
                found.append((who, text))
    return found


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


# What the responder knows of an uploaded file from its fileUri: (MIME type, size, first bytes).
FileFacts = Callable[[str], "tuple[str, int, bytes] | None"]

_KIND_WORDS = {"image": "an image", "audio": "audio", "video": "a video", "text": "a text file"}


# Part fields the API accepts under either name: protobuf's JSON mapping reads the original
# (snake_case) name as well as the lowerCamelCase one, and google-genai sends some parts either way.
_PART_FIELDS = {"inline_data": "inlineData", "file_data": "fileData", "mime_type": "mimeType",
                "file_uri": "fileUri", "display_name": "displayName", "function_call": "functionCall",
                "function_response": "functionResponse"}


def normalised(body: Any) -> Any:
    """``body`` with the parts' snake_case field names in lowerCamelCase (see ``_PART_FIELDS``)."""
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
        return body

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {_PART_FIELDS.get(k, k): fix(v) for k, v in value.items()}
        return value

    contents = [
        {**c, "parts": [fix(p) for p in c["parts"]]}
        if isinstance(c, dict) and isinstance(c.get("parts"), list) else c
        for c in body["contents"]
    ]
    return {**body, "contents": contents}


def first_words(data: bytes | str, n: int = 6) -> str:
    """The first ``n`` words of a text (bytes decoded as UTF-8)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return " ".join(text.split()[:n])


def describe_part(part: dict[str, Any], files: FileFacts | None = None) -> str:
    """One sentence about a part: "I see an image of N bytes, type T" for bytes sent inline,
    "I see an image of N bytes, type T, from the Files API" for a file, the first words of a text."""
    inline = part.get("inlineData")
    if isinstance(inline, dict):
        mime = str(inline.get("mimeType", "application/octet-stream"))
        data = str(inline.get("data", ""))
        raw = base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_") + "=" * (-len(data) % 4))
        return _sentence(mime, len(raw), raw[:200], "")
    file_data = part.get("fileData")
    if isinstance(file_data, dict):
        uri = str(file_data.get("fileUri", ""))
        facts = files(uri) if files is not None else None
        mime = str(file_data.get("mimeType") or (facts[0] if facts else "application/octet-stream"))
        size, head = (facts[1], facts[2]) if facts else (0, b"")
        return _sentence(mime, size, head, ", from the Files API")
    return f"I read a text that begins «{first_words(str(part.get('text', '')))}»."


def _sentence(mime: str, size: int, head: bytes, where: str) -> str:
    if mime == "application/pdf":
        return f"I see a PDF document of {size} bytes{where}."
    kind = _KIND_WORDS.get(mime.split("/")[0], "a file")
    sentence = f"I see {kind} of {size} bytes, type {mime}{where}."
    if mime.startswith("text/"):
        sentence += f" It begins «{first_words(head)}»."
    return sentence


def reply(body: dict[str, Any], files: FileFacts | None = None, rng: random.Random | None = None) -> str:
    """Return the emulator's answer to a ``generateContent`` request body.

    A last user turn of several parts (files, then the question) is answered with one sentence
    about each part but the last text, then the answer to that text. "Pick a number" is answered
    with a number drawn from ``rng`` (a model's sampling: asked twice, it answers differently).
    """
    contents = [c for c in body.get("contents", []) if isinstance(c, dict)]
    user_turns = [c for c in contents if c.get("role", "user") == "user"]
    parts = [p for p in (user_turns[-1].get("parts") or []) if isinstance(p, dict)] if user_turns else []
    if any("text" not in p for p in parts):
        texts = [i for i, p in enumerate(parts) if "text" in p]
        question = texts[-1] if texts else None
        about = [describe_part(p, files) for i, p in enumerate(parts) if i != question]
        asked = {**body, "contents": [*contents[:-1], {"role": "user", "parts": [parts[question]]}]} \
            if question is not None else None
        answer = _reply(asked, rng) if asked is not None else "That is all you sent."
        return "\n".join([*about, answer])
    return _reply(body, rng)


def _reply(body: dict[str, Any], rng: random.Random | None = None) -> str:
    contents = [c for c in body.get("contents", []) if isinstance(c, dict)]
    user_turns = [c for c in contents if c.get("role", "user") == "user"]
    last = said(user_turns[-1]) if user_turns else ""
    earlier = len(contents) - 1 if contents else 0
    prompt = last.strip().lower().rstrip("?!. ")

    if match := _FILE_CHANGE_RE.search(last):
        return "```python\n" + edit_file(match.group("body"), match.group("change")) + "```"
    if prompt in CANNED:
        return CANNED[prompt]
    if "pick a number" in prompt:
        return f"I pick {(rng or random.Random(0)).randint(1, 1_000_000)}."
    if match := _EXACT_CODE_RE.search(last):
        return code_of_length(int(match.group(1)))
    if prompt == "who am i":
        asking = speakers(user_turns[-1]) if user_turns else []
        return f"You are {asking[-1][0]}." if asking else "I can't tell who you are: nobody is named."
    if prompt.startswith("who said "):
        return _who_said(prompt.removeprefix("who said ").strip(), user_turns[:-1])
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


def edit_file(body: str, change: str) -> str:
    """A file changed as ``change`` says, deterministically: each ``replace "A" with "B"`` replaces
    every A by B, ``add line "X"`` appends the line X, ``prepend line "X"`` puts it first (``\\n`` in
    a quoted text is a newline). Anything else changes nothing."""
    for verb, first, second in _EDIT_RE.findall(change):
        a = first.replace("\\n", "\n").replace('\\"', '"')
        b = (second or "").replace("\\n", "\n").replace('\\"', '"')
        if verb == "replace":
            body = body.replace(a, b)
        elif verb == "add line":
            body = body + a + "\n"
        else:
            body = a + "\n" + body
    return body


def _who_said(words: str, earlier: list[dict[str, Any]]) -> str:
    """Which labelled speaker of the earlier user turns wrote ``words`` (the latest one who did)."""
    for content in reversed(earlier):
        for who, text in reversed(speakers(content)):
            if words and words in text.lower():
                return f"{who} said «{text.strip()}»."
    return f"Nobody here said «{words}»."


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


def code_of_length(n: int) -> str:
    """Exactly ``n`` characters: prose and fenced Python blocks (as ``prose_and_code``), then prose."""
    n = max(0, min(n, MAX_LENGTH))
    parts: list[str] = []
    size = 0  # the characters of the parts, each with the newline after it
    block = 0
    while True:
        code = "\n".join(f"value_{block}_{i} = {i} * 2  # line {i} of block {block}" for i in range(30))
        part = f"{words_of_length(300)}\n```python\n{code}\n```"
        if size + len(part) + 1 > n - 20:  # keep room for the closing prose
            break
        parts.append(part)
        size += len(part) + 1
        block += 1
    return "".join(f"{p}\n" for p in parts) + words_of_length(n - size)


def count_tokens(text: str) -> int:
    """Approximate tokens like the real API's rule of thumb (about four characters each)."""
    return max(1, (len(text) + 3) // 4) if text else 0


# -- tools Google runs (googleSearch, urlContext, codeExecution) ---------------------------------

_URL_RE = re.compile(r"https?://[^\s<>\"')\]]+")
_SLUG_RE = re.compile(r"[^a-z0-9]+")
# Hosts the emulated URL context tool cannot fetch (the real one reports ERROR, PAYWALL or UNSAFE).
UNREACHABLE_HOSTS = ("unreachable.example",)
SEARCH_SOURCES = (("example.com", "https://example.com"), ("example.org", "https://example.org"),
                  ("example.net", "https://example.net"))


def wants_search(prompt: str) -> bool:
    """Whether the emulated model chooses to search (the real one decides per prompt; "no search"
    in the prompt stands for a question it answers from what it knows)."""
    return "no search" not in prompt.lower()


def search_grounding(prompt: str, answer: str) -> dict[str, Any]:
    """A ``groundingMetadata`` like the Gemini API's for a Google-Search-grounded answer, with three
    deterministic sources on example domains.

    The shape is the REST reference's (GroundingMetadata: webSearchQueries, searchEntryPoint,
    groundingChunks[].web {uri, title}, groundingSupports[] {segment, groundingChunkIndices,
    confidenceScores}; https://ai.google.dev/api/generate-content#GroundingMetadata and
    google-genai's types.GroundingMetadata). The real chunks' ``uri`` is a long
    vertexaisearch.cloud.google.com/grounding-api-redirect/... link and its ``title`` the site's
    domain; here the link goes to the example domain itself.
    """
    query = " ".join(prompt.split())[:200]
    slug = _SLUG_RE.sub("-", query.lower()).strip("-")[:60] or "query"
    chunks = [{"web": {"uri": f"{base}/search/{slug}/{n}", "title": title}}
              for n, (title, base) in enumerate(SEARCH_SOURCES, start=1)]
    end = len(answer.encode())
    return {
        "webSearchQueries": [query],
        "searchEntryPoint": {"renderedContent": f"<div class=\"container\">{query}</div>"},
        "groundingChunks": chunks,
        "groundingSupports": [{
            "segment": {"startIndex": 0, "endIndex": end, "text": answer},
            "groundingChunkIndices": list(range(len(chunks))),
            "confidenceScores": [0.9] * len(chunks),
        }],
    }


def url_context(prompt: str) -> dict[str, Any] | None:
    """``urlContextMetadata`` for the URLs in the prompt (https://ai.google.dev/gemini-api/docs/url-context:
    ``url_metadata`` with ``retrieved_url`` and ``url_retrieval_status``), or None without a URL."""
    urls = list(dict.fromkeys(_URL_RE.findall(prompt)))[:20]
    if not urls:
        return None
    return {"urlMetadata": [{
        "retrievedUrl": url,
        "urlRetrievalStatus": "URL_RETRIEVAL_STATUS_ERROR" if any(h in url for h in UNREACHABLE_HOSTS)
        else "URL_RETRIEVAL_STATUS_SUCCESS",
    } for url in urls]}


_SUM_RE = re.compile(r"sum of (?:the numbers )?(\d+) (?:to|through) (\d+)", re.IGNORECASE)


def wants_code_execution(prompt: str) -> bool:
    """Whether the emulated model runs code: for "calculate"/"compute"/"run code" prompts."""
    lowered = prompt.lower()
    return any(word in lowered for word in ("calculate", "compute", "run code", "run some code"))


def code_execution_parts(prompt: str) -> list[dict[str, Any]]:
    """The parts of an answer that used the code execution tool, in the API's order: text, the
    ``executableCode`` the model wrote, the ``codeExecutionResult`` of running it, text
    (https://ai.google.dev/gemini-api/docs/code-execution; google-genai types.ExecutableCode,
    types.CodeExecutionResult). "sum of A to B" is computed; "fail" in the prompt makes the code raise.
    """
    match = _SUM_RE.search(prompt)
    low, high = (int(match.group(1)), int(match.group(2))) if match else (1, 100)
    if "fail" in prompt.lower():
        code = "print(1 / 0)\n"
        result = {"outcome": "OUTCOME_FAILED",
                  "output": "Traceback (most recent call last):\nZeroDivisionError: division by zero\n"}
        closing = "The code failed: it divided by zero."
    else:
        code = f"total = sum(range({low}, {high} + 1))\nprint(total)\n"
        total = sum(range(low, high + 1))
        result = {"outcome": "OUTCOME_OK", "output": f"{total}\n"}
        closing = f"The sum of {low} to {high} is {total}."
    return [
        {"text": "I'll calculate that with code."},
        {"executableCode": {"language": "PYTHON", "code": code}},
        {"codeExecutionResult": result},
        {"text": closing},
    ]


def parts_text(parts: list[dict[str, Any]]) -> str:
    """All the text of an answer's parts (text, code and output), for its token count."""
    out = []
    for part in parts:
        out.append(str(part.get("text") or ""))
        out.append(str((part.get("executableCode") or {}).get("code") or ""))
        out.append(str((part.get("codeExecutionResult") or {}).get("output") or ""))
    return "".join(out)
