"""Tools Google runs for an answer (Search grounding, URL context, code execution) and their sources.

A guild's managers turn each tool on or off for their guild (``/server tools``; the DataStore
``guild_settings`` file, key ``tools``); all are off by default, since grounding costs quota
(Google bills grounded prompts beyond a free daily allowance) and code execution lengthens
answers. DMs get no tools. ``services.gemini`` sends the tools and reads what Gemini returns:
the sources of a grounded answer (``Reply.sources``) and, for code execution, the code and its
output as fenced blocks in the text.

The sources go after the answer as one compact line of links, small text (Discord's ``-#``):
masked links (``[title](url)``) whose titles are cleaned of markdown, at most ``MAX_SOURCES``.
Discord shows a preview (an embed) for each link in a message; only the first source may have
one, the others are wrapped in angle brackets (``<url>``), which suppresses the preview
(Discord's markdown: "<https://...>" disables the embed of that link).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from services.gemini import TOOLS, Source

TOOL_NAMES: tuple[str, ...] = tuple(TOOLS)
"""The tools a guild may turn on, by the names the settings file and ``/server tools`` use."""
TOOL_LABELS = {
    "google_search": "Google Search grounding (answers cite web sources)",
    "url_context": "URL context (I read the links you send)",
    "code_execution": "code execution (I run Python to calculate)",
}
MAX_SOURCES = 5
MAX_TITLE_CHARS = 60
MAX_URI_CHARS = 500  # a longer address is left out: the line must fit a message with room to spare
_UNSAFE_TITLE = re.compile(r"[\[\]()<>*_~`|\\#@\n\r\t]+")
_ADDRESS = re.compile(r"\w+://\S*")  # Discord does not render a masked link whose text holds a URL


def clean_title(title: str) -> str:
    """A source title safe inside a masked link: no markdown, mention or link syntax, one line."""
    text = " ".join(_UNSAFE_TITLE.sub(" ", _ADDRESS.sub(" ", title)).split())
    if len(text) > MAX_TITLE_CHARS:
        text = text[: MAX_TITLE_CHARS - 1].rstrip() + "\u2026"
    return text or "source"


def sources_line(sources: Sequence[Source]) -> str:
    """The sources as one line of small text to put after an answer, or "" without sources.

    Only the first link may get Discord's preview; the others are in angle brackets.
    """
    links: list[str] = []
    for source in sources:
        if len(links) == MAX_SOURCES:
            break
        uri = source.uri
        if len(uri) > MAX_URI_CHARS or any(c in uri for c in " <>()\n"):
            continue
        target = uri if not links else f"<{uri}>"
        links.append(f"[{clean_title(source.title)}]({target})")
    if not links:
        return ""
    return "-# Sources: " + " \u00b7 ".join(links)


def sources_markdown(sources: Sequence[Source]) -> str:
    """The sources as a markdown list, for an answer sent as a file (no previews there)."""
    lines = [f"- [{clean_title(s.title)}]({s.uri})" for s in sources[:MAX_SOURCES]]
    return "## Sources\n\n" + "\n".join(lines) if lines else ""
