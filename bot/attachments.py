"""Attachments: what people send with a message, read and passed to Gemini.

Three moments, each kept to what it may cost:

- **Acceptance** (``collect``, no I/O): the message's files (attachments, a voice message, an
  embed's image, stickers by name, and those of the message it replies to) are checked against
  the limits (``ATTACHMENT_*`` settings) and become ``FileRef``s: metadata and a re-fetch plan,
  stored in the queue item's payload with the one transaction that accepts it. A file over a
  limit, of a kind not read, or of an unknown type gets one sentence naming it and the limit.
- **Answering** (``Attachments.generate``): each file's bytes come from the spool, else its CDN
  URL while it is valid, else the message read again through ``discord.read`` for a fresh URL
  (Discord's signed URLs expire); every download goes through ``DiscordIO.download`` (the
  ``discord.read`` breaker and timeout, bounded in bytes). Images, PDFs, audio and video become
  ``types.Part.from_bytes`` while the message's files total at most ``GEMINI_INLINE_MAX_BYTES``;
  larger ones go through the Files API (``GeminiFiles``: its own breaker, a bounded wait for
  ACTIVE). Text and code files are decoded and sent as text with their name; a GIF's first frame
  as PNG. A file that cannot be had any more (deleted, damaged) is left out with a sentence;
  a transient failure (the CDN, Discord or the Files API down) raises, and the item is queued.
- **History**: the references (never the bytes) of the newest ``HISTORY_FILES`` files of a
  conversation are stored (``attachment_refs``); a later question is sent with them again, as a
  Files API URI while it is valid, else re-fetched, else a short placeholder text.

Downloaded bytes are written through to a bounded spool (``DATA_DIR/spool``, owner-only,
``ATTACHMENT_SPOOL_MAX_BYTES``, oldest out first), so a message queued after its first try is
answered with its files even if Discord deleted them meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
import structlog
from google.genai import errors, types

from bot import gif, texts
from services.config import Config
from services.datadir import make_private_dir
from services.discord_io import DownloadTooLargeError
from services.gemini import (
    FILES_BREAKER,
    FileRejectedError,
    GeminiFiles,
    GenerationOptions,
    PartLike,
    Reply,
    ReplyKind,
    StreamObserver,
)
from services.storage import Turn
from services.tools import FunctionCaller

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.attachments")

HISTORY_FILES = 3  # files of earlier turns sent again with a later question, per conversation
URI_MARGIN = 600.0  # a Gemini file URI this close to its expiry is not used any more
TEXT_FILE_MAX_CHARS = 200_000  # of one text file, sent to Gemini; the rest is cut, and said so
REPLY_CHAIN_DEPTH = 3  # messages followed up a reply chain for the files it quotes
SPOOL_DIR = "spool"

# Gemini's MIME types (https://ai.google.dev/gemini-api/docs: image, audio, video and document
# understanding), and the names Discord gives some of them.
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif", "image/gif"})
AUDIO_TYPES = {
    "audio/ogg": "audio/ogg", "audio/mpeg": "audio/mp3", "audio/mp3": "audio/mp3",
    "audio/wav": "audio/wav", "audio/x-wav": "audio/wav", "audio/wave": "audio/wav",
    "audio/aac": "audio/aac", "audio/flac": "audio/flac", "audio/x-flac": "audio/flac",
    "audio/aiff": "audio/aiff", "audio/x-aiff": "audio/aiff",
}
VIDEO_TYPES = {
    "video/mp4": "video/mp4", "video/mpeg": "video/mpeg", "video/quicktime": "video/mov",
    "video/mov": "video/mov", "video/webm": "video/webm", "video/x-msvideo": "video/avi",
    "video/avi": "video/avi", "video/3gpp": "video/3gpp", "video/x-flv": "video/x-flv",
}
TEXT_EXTENSIONS = frozenset(
    "txt md markdown rst csv tsv json jsonl yaml yml toml ini cfg conf log xml html htm css js mjs ts "
    "tsx jsx py pyi rb go rs java kt kts c h cc cpp hpp cs swift php pl sh bash zsh ps1 sql r lua "
    "dart scala hs ex exs erl clj vue svelte tex diff patch env gitignore dockerfile makefile".split()
)
_EXTENSION_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
    "gif": "image/gif", "heic": "image/heic", "heif": "image/heif", "pdf": "application/pdf",
    "ogg": "audio/ogg", "mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "aac": "audio/aac",
    "mp4": "video/mp4", "mov": "video/quicktime", "webm": "video/webm",
}
_KIND_NAMES = {"image": "image", "text": "text file", "pdf": "PDF", "audio": "audio file", "video": "video"}


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file to read: what it is, and where to get it again (never its bytes).

    ``key`` names it in the spool (an attachment's id; an embed's image: message id and index);
    ``index`` is its place in the message (an embed's, for a re-read).
    """

    key: str
    name: str
    kind: str
    mime: str
    size: int
    url: str
    message_id: int
    channel_id: int
    source: str = "attachment"  # or "embed"
    index: int = 0
    voice: bool = False
    gemini_uri: str | None = None
    gemini_expires: float | None = None

    def payload(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> FileRef:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def label(self) -> str:
        """How the file is named to the user and to Gemini."""
        return "your voice message" if self.voice else self.name


@dataclass(frozen=True, slots=True)
class Collected:
    """What ``collect`` found in a message: files to read, sentences for those refused, and the
    message a reply chain continues at (``chain``: channel id, message id), if any."""

    files: tuple[FileRef, ...] = ()
    refused: tuple[str, ...] = ()
    chain: tuple[int, int] | None = None
    stickers: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.files or self.refused or self.chain or self.stickers)

    def payload(self) -> dict[str, Any]:
        """The queue payload's part: what a later process needs to answer with the files."""
        out: dict[str, Any] = {}
        if self.files:
            out["files"] = [f.payload() for f in self.files]
        if self.refused:
            out["refused"] = list(self.refused)
        if self.chain:
            out["chain"] = list(self.chain)
        if self.stickers:
            out["stickers"] = list(self.stickers)
        return out


NOTHING = Collected()


def classify_file(name: str, content_type: str | None) -> tuple[str | None, str]:
    """(kind, Gemini MIME type) of a file from Discord's content type and its name; kind None if
    the bot cannot read it."""
    mime = (content_type or "").split(";")[0].strip().lower()
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else name.lower()
    if not mime or mime == "application/octet-stream":
        mime = _EXTENSION_TYPES.get(extension, "text/plain" if extension in TEXT_EXTENSIONS else mime)
    if mime in IMAGE_TYPES:
        return "image", mime
    if mime == "application/pdf":
        return "pdf", mime
    if mime in AUDIO_TYPES:
        return "audio", AUDIO_TYPES[mime]
    if mime in VIDEO_TYPES:
        return "video", VIDEO_TYPES[mime]
    if mime.startswith("text/") or extension in TEXT_EXTENSIONS or mime in (
        "application/json", "application/xml", "application/javascript", "application/x-sh",
        "application/x-python", "application/toml", "application/yaml", "application/x-yaml",
    ):
        return "text", "text/plain"
    return None, mime


Found = list[tuple[discord.Message, "discord.Attachment | discord.Embed", int]]


def _found_in(message: discord.Message) -> Found:
    """A message's attachments and embedded images, each with its message and its place."""
    found: Found = [(message, a, i) for i, a in enumerate(message.attachments)]
    return found + [(message, e, i) for i, e in enumerate(message.embeds) if _embed_image(e)]


def collect(message: discord.Message, config: Config) -> Collected:
    """The files of ``message`` (and of the message it replies to) within the limits; no I/O."""
    found = _found_in(message)
    chain: tuple[int, int] | None = None
    reference = message.reference
    resolved = reference.resolved if reference is not None else None
    if isinstance(resolved, discord.Message):
        quoted = _found_in(resolved)
        found += quoted
        parent = resolved.reference
        if not quoted and parent is not None and parent.message_id is not None:
            chain = (parent.channel_id or resolved.channel.id, parent.message_id)
    stickers = tuple(s.name for s in message.stickers)
    if not found:
        return Collected(chain=chain, stickers=stickers) if chain or stickers else NOTHING
    files, refused = _within_limits(found, config)
    return Collected(files, refused, chain, stickers)


def collect_own(message: discord.Message, config: Config) -> list[FileRef]:
    """The files of ``message`` itself, within the limits (a reply chain's quoted message)."""
    return list(_within_limits(_found_in(message), config)[0])


def _within_limits(found: Found, config: Config) -> tuple[tuple[FileRef, ...], tuple[str, ...]]:
    """The files to read, and a sentence for each one refused (naming it and the limit)."""
    files: list[FileRef] = []
    refused: list[str] = []
    total = 0
    for source, thing, index in found:
        if isinstance(thing, discord.Embed):
            url = _embed_image(thing) or ""
            name = _name_from_url(url)
            kind, mime = classify_file(name, None)
            size, voice, key, src = 0, False, f"{source.id}.embed{index}", "embed"
        else:
            name, url, size = thing.filename, thing.url, thing.size
            kind, mime = classify_file(name, thing.content_type)
            voice, key, src = thing.is_voice_message(), str(thing.id), "attachment"
        label = "your voice message" if voice else name
        if kind is None:
            refused.append(texts.attachment_unknown_type(label))
        elif kind not in config.attachment_types:
            refused.append(texts.attachment_kind_off(label, _KIND_NAMES[kind]))
        elif len(files) >= config.attachment_max_count:
            refused.append(texts.attachment_too_many(label, config.attachment_max_count))
        elif size > config.attachment_max_file_bytes:
            refused.append(texts.attachment_too_large(label, size, config.attachment_max_file_bytes))
        elif total + size > config.attachment_max_message_bytes:
            refused.append(texts.attachment_total_too_large(label, config.attachment_max_message_bytes))
        else:
            total += size
            files.append(
                FileRef(key, name, kind, mime, size, url, source.id, source.channel.id, src, index, voice)
            )
    return tuple(files), tuple(refused)


def _embed_image(embed: discord.Embed) -> str | None:
    """An embed's image as Discord's media proxy serves it (an image link, a GIF), if it has one.
    Only the proxy URL: the bot never fetches an arbitrary address a user posted."""
    if embed.type not in ("image", "gifv", "rich"):
        return None
    for media in (embed.image, embed.thumbnail):
        if media.proxy_url:
            return media.proxy_url
    return None


def _name_from_url(url: str) -> str:
    path = url.split("?", 1)[0].rstrip("/")
    return path.rsplit("/", 1)[-1] or "image"


def files_of(payload: dict[str, Any]) -> list[FileRef]:
    """The files a queue payload carries."""
    return [FileRef.from_payload(f) for f in payload.get("files") or [] if isinstance(f, dict)]


def describe(payload: dict[str, Any]) -> str:
    """The files of a payload named for a quote ("cat.png, notes.txt"), "" without files."""
    return ", ".join(f.label for f in files_of(payload))


# --- bytes: sniffing, conversion, text ----------------------------------------------------------


def looks_like(kind: str, mime: str, data: bytes) -> bool:
    """Whether ``data`` starts like a file of its declared type (a damaged or mislabelled file
    does not, and Gemini would refuse the whole request for it)."""
    if kind == "pdf":
        return data[:1024].lstrip().startswith(b"%PDF-")
    if kind == "image":
        return {
            "image/png": data.startswith(b"\x89PNG\r\n\x1a\n"),
            "image/jpeg": data.startswith(b"\xff\xd8\xff"),
            "image/gif": data[:6] in (b"GIF87a", b"GIF89a"),
            "image/webp": data[:4] == b"RIFF" and data[8:12] == b"WEBP",
        }.get(mime, data[4:8] == b"ftyp")  # HEIC/HEIF: an ISO media file
    if kind == "audio":
        return {
            "audio/ogg": data.startswith(b"OggS"),
            "audio/wav": data[:4] == b"RIFF" and data[8:12] == b"WAVE",
            "audio/flac": data.startswith(b"fLaC"),
            "audio/mp3": data.startswith(b"ID3") or (len(data) > 1 and data[0] == 0xFF and data[1] >= 0xE0),
        }.get(mime, len(data) > 0)
    if kind == "video":
        if mime == "video/webm":
            return data.startswith(b"\x1a\x45\xdf\xa3")
        return data[4:8] == b"ftyp" or mime not in ("video/mp4", "video/mov")
    return True


def decode_text(data: bytes) -> str | None:
    """A text file's content (UTF-8, or UTF-16 with its BOM); None when it is not text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


# --- the spool -----------------------------------------------------------------------------------


class Spool:
    """Downloaded files on disk, at most ``max_bytes`` in all (the oldest written go first).

    One file per key under ``directory`` (created 0700; files 0600: they are users' content).
    Keys are Discord ids (digits and dots), so a key is never a path. A read or write that fails
    is logged and treated as a miss: the spool only spares a download.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] | None = None  # key -> size, oldest first (loaded lazily)
        self._lock = threading.Lock()  # get and put run in worker threads (asyncio.to_thread)

    def _path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9][0-9A-Za-z.]*", key):
            raise ValueError("not a spool key")
        return self.directory / key

    def _index(self) -> dict[str, int]:
        if self._sizes is None:
            make_private_dir(self.directory)
            entries = []
            for path in self.directory.iterdir():
                if path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # a write a crash interrupted
                    continue
                stat = path.stat()
                entries.append((stat.st_mtime, path.name, stat.st_size))
            self._sizes = {name: size for _, name, size in sorted(entries)}
        return self._sizes

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._index().values())

    def get(self, key: str) -> bytes | None:
        if self.max_bytes <= 0:
            return None
        with self._lock:
            if key not in self._index():
                return None
            try:
                return self._path(key).read_bytes()
            except OSError:
                self._index().pop(key, None)
                return None

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            self._put(key, data)

    def _put(self, key: str, data: bytes) -> None:
        sizes = self._index()
        path = self._path(key)
        sizes.pop(key, None)
        while sizes and sum(sizes.values()) + len(data) > self.max_bytes:
            oldest = next(iter(sizes))
            sizes.pop(oldest)
            (self.directory / oldest).unlink(missing_ok=True)
        temp = path.with_name(path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        temp.replace(path)
        sizes[key] = len(data)


# --- answering with files ------------------------------------------------------------------------


@dataclass
class Prepared:
    """What goes to Gemini with a question: its files as parts, the parts of earlier turns, the
    sentences for the user about files left out, and the references to remember."""

    parts: list[PartLike] = field(default_factory=list)
    history_parts: dict[int, list[PartLike]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sent: list[FileRef] = field(default_factory=list)  # this message's files that reached Gemini
    updated: dict[int, FileRef] = field(default_factory=dict)  # history refs with a new Gemini URI
    uses_uris: bool = False

    @property
    def empty(self) -> bool:
        return not self.parts and not self.history_parts


class _Unavailable(Exception):
    """A file that cannot be had any more (deleted, damaged, too large): left out, with a sentence."""

    def __init__(self, sentence: str) -> None:
        super().__init__("file unavailable")
        self.sentence = sentence


class Attachments:
    """Reads files for answers and remembers them for later turns; one per application."""

    def __init__(self, app: Application) -> None:
        self.app = app
        cfg = app.config
        self.spool = Spool(cfg.data_dir / SPOOL_DIR, cfg.attachment_spool_max_bytes)
        board = app.board
        breaker = board.get(FILES_BREAKER) if FILES_BREAKER in board else board.add(FILES_BREAKER)
        self.files = GeminiFiles(
            app.gemini,
            breaker,
            clock=app.clock,
            timeout=cfg.gemini_timeout_seconds,
            max_wait=min(60.0, cfg.processing_timeout_seconds / 2),
        )
        self._keys_with_refs: set[str] | None = None

    # -- generation -------------------------------------------------------------------------

    async def generate(
        self,
        payload: dict[str, Any],
        content: str,
        key: str,
        history: list[Turn],
        *,
        tools: Sequence[str] = (),
        persona: str | None = None,
        options: GenerationOptions | None = None,
        observer: StreamObserver | None = None,
        functions: FunctionCaller | None = None,
    ) -> tuple[Reply, Prepared]:
        """Gemini's reply to ``content`` with the payload's files and those of earlier turns, the
        Google-run ``tools`` the guild turned on, and the server's ``persona`` and ``options``
        (``bot.settings``); streamed to ``observer`` when there is one (``bot.streaming``).

        Without any file (the usual case) this is ``gemini.generate`` and costs nothing more.
        A Gemini file that vanished before its expiry (403) is replaced by its bytes, once.
        """
        gemini = self.app.gemini
        generate, generate_with_parts = (gemini.generate, gemini.generate_with_parts)
        if observer is not None:
            generate = partial(gemini.stream, observer=observer)
            generate_with_parts = partial(gemini.stream_with_parts, observer=observer)
        prepared = await self.prepare(payload, key, history)
        if prepared.empty and not content:
            # Only files, and none could be had: the sentences about them are the answer.
            notes = " ".join(prepared.notes) or texts.no_answer()
            return Reply(ReplyKind.EMPTY, "", "", user_message=notes), Prepared()
        if prepared.empty:
            reply = await generate(
                content, history, tools=tools, persona=persona, options=options, functions=functions
            )
            return reply, prepared
        try:
            reply = await generate_with_parts(
                content, prepared.parts, history, history_parts=prepared.history_parts, tools=tools,
                persona=persona, options=options, functions=functions,
            )
        except errors.ClientError as exc:
            if exc.code == 403 and prepared.uses_uris:
                log.info("attachments.file_uri_gone")
                prepared = await self.prepare(payload, key, history, reuse_uris=False)
            elif exc.code == 400 and (media := _media_names(prepared)):
                # Gemini could not read a file that looked right (damaged inside): answer the rest.
                log.info("attachments.files_refused_by_gemini", files=len(media))
                prepared = _without_media(prepared, texts.attachments_unreadable(media))
                if prepared.empty and not content:
                    return Reply(ReplyKind.EMPTY, "", "", user_message=" ".join(prepared.notes)), prepared
            else:
                raise
            reply = await generate_with_parts(
                content, prepared.parts, history, history_parts=prepared.history_parts, tools=tools,
                persona=persona, options=options, functions=functions,
            )
        return reply, prepared

    async def prepare(
        self, payload: dict[str, Any], key: str, history: list[Turn], *, reuse_uris: bool = True
    ) -> Prepared:
        """The parts for a question's files and its history's; raises on a transient failure."""
        prepared = Prepared(notes=[str(n) for n in payload.get("refused") or []])
        files = files_of(payload)
        if payload.get("chain"):
            channel_id, message_id = (int(x) for x in payload["chain"])
            files += await self._follow_chain(channel_id, message_id)
        if payload.get("stickers"):
            names = ", ".join(str(s) for s in payload["stickers"])
            prepared.parts.append({"text": f"[The user sent the sticker(s): {names}]"})
        current = {f.key for f in files}
        refs = [r for r in await self._history_refs(key, history) if r[1][1].key not in current]
        if not files and not refs:
            return prepared
        now = self.app.clock.time()
        loaded: list[tuple[FileRef, bytes | None, int | None]] = []  # (file, bytes, history index)
        for f in files:
            try:
                loaded.append((f, await self._bytes(f), None))
            except _Unavailable as gone:
                prepared.notes.append(gone.sentence)
        for index, (_ref_id, f) in refs:
            if reuse_uris and f.gemini_uri and (f.gemini_expires or 0) - now > URI_MARGIN:
                loaded.append((f, None, index))
                continue
            try:
                loaded.append((f, await self._bytes(f), index))
            except _Unavailable:
                prepared.history_parts.setdefault(index, []).append(
                    {"text": texts.file_no_longer_available(_KIND_NAMES[f.kind], f.label)}
                )
        # Inline while the bytes fit in one request; past that, the largest go to the Files API.
        inline = sum(len(b) for f, b, _ in loaded if b is not None and f.kind != "text")
        budget = self.app.config.gemini_inline_max_bytes
        order = sorted(
            (i for i, (f, b, _) in enumerate(loaded) if b is not None and f.kind != "text"),
            key=lambda i: -len(loaded[i][1] or b""),
        )
        upload = set()
        for i in order:
            if inline <= budget:
                break
            upload.add(i)
            inline -= len(loaded[i][1] or b"")
        history_ids = {f.key: ref_id for _, (ref_id, f) in refs}
        for i, (f, data, at) in enumerate(loaded):
            target = prepared.parts if at is None else prepared.history_parts.setdefault(at, [])
            try:
                part, f = await self._part(f, data, upload=i in upload, notes=prepared.notes)
            except _Unavailable as gone:
                if at is None:
                    prepared.notes.append(gone.sentence)
                else:
                    target.append({"text": texts.file_no_longer_available(_KIND_NAMES[f.kind], f.label)})
                continue
            target.append(part)
            if f.gemini_uri and data is None:
                prepared.uses_uris = True
            if at is None:
                prepared.sent.append(f)
            elif f.key in history_ids and i in upload:
                prepared.updated[history_ids[f.key]] = f
        return prepared

    async def _part(
        self, f: FileRef, data: bytes | None, *, upload: bool, notes: list[str]
    ) -> tuple[PartLike, FileRef]:
        if data is None:  # a Gemini file still valid
            assert f.gemini_uri is not None
            return types.Part.from_uri(file_uri=f.gemini_uri, mime_type=f.mime), f
        if f.kind == "text":
            text = decode_text(data)
            if text is None:
                raise _Unavailable(texts.attachment_damaged(f.label, "text file"))
            if len(text) > TEXT_FILE_MAX_CHARS:
                text = text[:TEXT_FILE_MAX_CHARS]
                notes.append(texts.attachment_text_cut(f.label, TEXT_FILE_MAX_CHARS))
            return {"text": f"[File {f.name}]\n{text}\n[End of file {f.name}]"}, f
        mime = f.mime
        if not looks_like(f.kind, mime, data):
            raise _Unavailable(texts.attachment_damaged(f.label, _KIND_NAMES[f.kind]))
        if mime == "image/gif":
            try:
                data, mime = await asyncio.to_thread(gif.first_frame_png, data), "image/png"
            except gif.GifError as exc:
                raise _Unavailable(texts.attachment_damaged(f.label, "image")) from exc
        if not upload:
            return types.Part.from_bytes(data=data, mime_type=mime), f
        try:
            uploaded = await self.files.upload(data, mime, f.name)
        except FileRejectedError as exc:
            raise _Unavailable(texts.attachment_rejected(f.label)) from exc
        f = FileRef(**{**asdict(f), "gemini_uri": uploaded.uri, "gemini_expires": uploaded.expires_at})
        return types.Part.from_uri(file_uri=uploaded.uri, mime_type=mime), f

    # -- getting the bytes ------------------------------------------------------------------

    async def _bytes(self, f: FileRef) -> bytes:
        """The file's bytes: spool, else its URL while valid, else a fresh URL from the message."""
        cached = await asyncio.to_thread(self.spool.get, f.key)
        if cached is not None:
            return cached
        limit = self.app.config.attachment_max_file_bytes
        data: bytes | None = None
        if f.url and not url_expired(f.url, self.app.clock.time()):
            try:
                data = await self.app.discord_io.download(f.url, max_bytes=limit)
            except (discord.NotFound, discord.Forbidden):
                data = None  # expired after all, or gone: ask Discord for the message again
            except DownloadTooLargeError as exc:
                raise _Unavailable(texts.attachment_too_large(f.label, exc.limit + 1, limit)) from exc
        if data is None:
            url = await self._fresh_url(f)
            try:
                data = await self.app.discord_io.download(url, max_bytes=limit)
            except (discord.NotFound, discord.Forbidden) as exc:
                raise _Unavailable(texts.attachment_gone(f.label)) from exc
            except DownloadTooLargeError as exc:
                raise _Unavailable(texts.attachment_too_large(f.label, exc.limit + 1, limit)) from exc
        try:
            await asyncio.to_thread(self.spool.put, f.key, data)
        except (OSError, ValueError) as exc:
            log.warning("attachments.spool_write_failed", error=type(exc).__name__)
        return data

    async def _fresh_url(self, f: FileRef) -> str:
        """The file's URL from its message read again (Discord signs a fresh one on each read)."""
        try:
            channel = await self.app.channel(f.channel_id)
            message = await self.app.discord_io.fetch_message(channel, f.message_id)
        except (discord.NotFound, discord.Forbidden) as exc:
            raise _Unavailable(texts.attachment_gone(f.label)) from exc
        if f.source == "embed":
            embeds = message.embeds
            url = _embed_image(embeds[f.index]) if f.index < len(embeds) else None
        else:
            url = next((a.url for a in message.attachments if str(a.id) == f.key), None)
        if not url:
            raise _Unavailable(texts.attachment_gone(f.label))
        return url

    async def _follow_chain(self, channel_id: int, message_id: int) -> list[FileRef]:
        """The files of the nearest message up a reply chain that has some (a few hops at most)."""
        cfg = self.app.config
        try:
            channel = await self.app.channel(channel_id)
            for _ in range(REPLY_CHAIN_DEPTH):
                message = await self.app.discord_io.fetch_message(channel, message_id)
                found = collect_own(message, cfg)
                if found:
                    return found
                ref = message.reference
                if ref is None or ref.message_id is None:
                    return []
                message_id = ref.message_id
        except (discord.NotFound, discord.Forbidden):
            return []
        return []

    # -- history ----------------------------------------------------------------------------

    async def _history_refs(
        self, key: str, history: list[Turn]
    ) -> list[tuple[int, tuple[int, FileRef]]]:
        """(history index, (ref id, file)): the conversation's remembered files still in ``history``."""
        if not history:
            return []
        if self._keys_with_refs is None:
            self._keys_with_refs = await self.app.storage.attachment_ref_keys()
        if key not in self._keys_with_refs:
            return []
        rows = await self.app.storage.attachment_refs(key, limit=HISTORY_FILES)
        turns = {t.message_id: i for i, t in enumerate(history) if t.role == "user" and t.message_id}
        found = []
        for ref_id, message_id, data in rows:
            index = turns.get(message_id)
            if index is not None:
                found.append((index, (ref_id, FileRef.from_payload(data))))
        return found

    async def remember(self, key: str, message_id: int, prepared: Prepared) -> None:
        """Keep references to the files an answered question was sent with (for later turns);
        a failure loses only the back-reference, never the answer."""
        try:
            for ref_id, f in prepared.updated.items():
                await self.app.storage.update_attachment_ref(ref_id, f.payload())
            if prepared.sent:
                await self.app.storage.record_attachment_refs(
                    key, message_id, [f.payload() for f in prepared.sent], keep=HISTORY_FILES,
                    now=self.app.clock.time(),
                )
                if self._keys_with_refs is not None:
                    self._keys_with_refs.add(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("attachments.remember_failed", error=type(exc).__name__)



def _is_media(part: PartLike) -> bool:
    return not (isinstance(part, dict) and "text" in part)


def _media_names(prepared: Prepared) -> list[str]:
    """The files sent as media (not text), by the names the user knows; [] when there is none."""
    earlier = any(_is_media(p) for ps in prepared.history_parts.values() for p in ps)
    if not earlier and not any(_is_media(p) for p in prepared.parts):
        return []
    names = [f.label for f in prepared.sent if f.kind != "text"]
    return [*names, "the earlier files"] if earlier else names


def _without_media(prepared: Prepared, note: str) -> Prepared:
    """``prepared`` with only its text parts (its files' and its history's), and ``note`` added."""
    return Prepared(
        parts=[p for p in prepared.parts if not _is_media(p)],
        history_parts={i: kept for i, ps in prepared.history_parts.items() if (kept := [
            p for p in ps if not _is_media(p)])},
        notes=[*prepared.notes, note],
        sent=[f for f in prepared.sent if f.kind == "text"],
    )


def url_expired(url: str, now: float) -> bool:
    """Whether a signed CDN URL's ``ex`` (hex unix time) has passed; False when it has none."""
    match = re.search(r"[?&]ex=([0-9a-fA-F]+)", url)
    return match is not None and int(match.group(1), 16) <= now
