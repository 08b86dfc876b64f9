"""Answers too long for chat go as files: the opening plus ``answer.md``, big code blocks as code files.

Ten chat messages in a row bury a conversation. An answer longer than ``LONG_ANSWER_CHARS`` is
sent as one message, its opening paragraph and a line saying the whole answer is attached, with
the whole answer as ``answer.md`` (Discord previews text files inline). In a shorter answer, a
code block longer than ``CODE_FILE_CHARS`` becomes a file named for its language
(``snippet-1.py``), with a one-line pointer where it stood; at most ``MAX_FILES`` files (Discord
takes ten per message), further blocks stay in the text.

The files travel with the answer's chunks through the same durable delivery
(``Answerer.deliver``): they are attached to the last chunk, whose nonce and invisible mark
(``bot.marks``) make a resend after a lost response, or after a restart, post them once. They
are kept in the queue item's payload (``AnswerFiles.payload``) while the answer waits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import discord

from services.discord_io import MAX_FILES_PER_MESSAGE, Upload

ANSWER_FILE = "answer.md"
OPENING_CHARS = 1200
"""The most of the answer's opening paragraph shown in chat before the attached whole."""
MAX_FILES = MAX_FILES_PER_MESSAGE
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$")
_EXTENSIONS = {
    "python": "py", "py": "py", "python3": "py", "javascript": "js", "js": "js", "jsx": "jsx",
    "typescript": "ts", "ts": "ts", "tsx": "tsx", "java": "java", "kotlin": "kt", "kt": "kt",
    "c": "c", "h": "h", "cpp": "cpp", "c++": "cpp", "cc": "cpp", "csharp": "cs", "cs": "cs", "c#": "cs",
    "go": "go", "golang": "go", "rust": "rs", "rs": "rs", "ruby": "rb", "rb": "rb", "php": "php",
    "swift": "swift", "scala": "scala", "r": "r", "lua": "lua", "perl": "pl", "haskell": "hs",
    "bash": "sh", "sh": "sh", "shell": "sh", "zsh": "sh", "powershell": "ps1", "ps1": "ps1",
    "sql": "sql", "html": "html", "css": "css", "scss": "scss", "json": "json", "yaml": "yaml",
    "yml": "yaml", "toml": "toml", "xml": "xml", "ini": "ini", "markdown": "md", "md": "md",
    "dockerfile": "dockerfile", "makefile": "mk", "diff": "diff", "tex": "tex", "latex": "tex",
}


@dataclass(frozen=True, slots=True)
class AnswerFile:
    """A file of an answer: its name and text."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class AnswerFiles:
    """The files of an answer and the number of the chunk they are attached to."""

    at: int
    files: tuple[AnswerFile, ...]

    def payload(self) -> dict[str, Any]:
        """As a queue item keeps it."""
        return {"at": self.at, "files": [{"name": f.name, "text": f.text} for f in self.files]}

    @classmethod
    def from_payload(cls, data: Any) -> AnswerFiles | None:
        """From a queue item's payload (None when there are none or it is not readable)."""
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            return None
        files = tuple(
            AnswerFile(str(f["name"]), str(f["text"]))
            for f in data["files"]
            if isinstance(f, dict) and "name" in f and "text" in f
        )
        return cls(int(data.get("at", 0)), files) if files else None

    def uploads(self) -> dict[int, list[Upload]]:
        """For ``DiscordIO.send_chunks``: the files as uploads, by chunk number."""
        return {self.at: [Upload(f.name, f.text.encode()) for f in self.files]}


@dataclass(frozen=True, slots=True)
class Shaped:
    """An answer as it goes to chat: the ``text`` to split into messages and the ``files`` to attach."""

    text: str
    files: tuple[AnswerFile, ...] = ()


def shape(
    text: str, *, long_chars: int, code_chars: int, appendix: str = "", file_appendix: str = ""
) -> Shaped:
    """``text`` (plus ``appendix``, a line for chat such as the sources) as chat messages and files.

    Over ``long_chars`` the whole answer goes as ``answer.md`` (with ``file_appendix`` at its end)
    and the chat gets its opening; otherwise code blocks over ``code_chars`` become files.
    """
    tail = f"\n\n{appendix}" if appendix else ""
    if len(text) > long_chars:
        whole = text.rstrip() + (f"\n\n{file_appendix}\n" if file_appendix else "\n")
        note = f"\U0001f4ce The whole answer ({len(text):,} characters) is in the attached `{ANSWER_FILE}`."
        lead = opening(text)
        message = f"{lead}\n\n{note}{tail}" if lead else f"{note}{tail}"
        return Shaped(message, (AnswerFile(ANSWER_FILE, whole),))
    body, files = extract_code(text, code_chars)
    return Shaped(body + tail, files)


def opening(text: str, limit: int = OPENING_CHARS) -> str:
    """The answer's first paragraph (text before the first blank line or code block), cut at a
    sentence or a word within ``limit`` characters; "" when the answer opens with code."""
    lines: list[str] = []
    for line in text.strip().split("\n"):
        if not line.strip() or _FENCE.match(line):
            break
        lines.append(line)
    para = "\n".join(lines).strip()
    if len(para) <= limit:
        return para
    cut = para[:limit]
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "), cut.rfind("\n"))
    if end > limit // 2:
        return cut[: end + 1].rstrip()
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "\u2026"


def extension(language: str) -> str:
    """The file extension for a code block's info string ("python" -> "py"); "txt" if unknown."""
    return _EXTENSIONS.get(language.strip().lower(), "txt")


def extract_code(text: str, code_chars: int) -> tuple[str, tuple[AnswerFile, ...]]:
    """``text`` with each fenced code block longer than ``code_chars`` (at most ``MAX_FILES``) replaced
    by a pointer line, and those blocks as files named for their language."""
    out: list[str] = []
    files: list[AnswerFile] = []
    block: list[str] | None = None
    opener = marker = language = ""
    for line in text.split("\n"):
        if block is None:
            match = _FENCE.match(line)
            if match is None:
                out.append(line)
                continue
            block, opener, marker, language = [], line, match.group(1), match.group(2)
            continue
        stripped = line.strip()
        if stripped.startswith(marker[0] * len(marker)) and not stripped.strip(marker[0]):
            code = "\n".join(block)
            if len(code) > code_chars and len(files) < MAX_FILES:
                name = f"snippet-{len(files) + 1}.{extension(language)}"
                files.append(AnswerFile(name, code + "\n"))
                lines = code.count("\n") + 1
                what = f"{lines} lines of {language}" if language else f"{lines} lines"
                out.append(f"\U0001f4ce `{name}` ({what}, attached)")
            else:
                out += [opener, *block, line]
            block = None
            continue
        block.append(line)
    if block is not None:  # an unclosed block stays as it was
        out += [opener, *block]
    return "\n".join(out), tuple(files)


def can_attach(channel: object) -> bool:
    """Whether the bot may upload files where ``channel`` is, by discord.py's cache (no I/O): in a
    server channel or thread it needs Attach Files (Discord refuses an upload without it, 403
    50013); a DM or an interaction's follow-up may carry files. Without it, a long answer goes as
    chat messages as before."""
    if isinstance(channel, discord.abc.GuildChannel | discord.Thread):
        me = channel.guild.me
        return me is None or channel.permissions_for(me).attach_files
    return True


def attach(shaped: Shaped, chunks: Sequence[str], first: int = 0) -> AnswerFiles | None:
    """The files of ``shaped``, attached to the last of ``chunks`` (numbered from ``first``)."""
    if not shaped.files or not chunks:
        return None
    return AnswerFiles(first + len(chunks) - 1, shaped.files)
