"""The pure parts of bot/attachments.py and bot/gif.py: what a message's files become at
acceptance (limits, kinds, sentences; no I/O), the checks on downloaded bytes, the spool's bound,
signed URL expiry, and a GIF's first frame as PNG."""

from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bot import texts
from bot.attachments import Spool, classify_file, collect, decode_text, looks_like, url_expired
from bot.gif import GifError, first_frame_png
from services.config import load_config

CONFIG = load_config(environ={}, env_file=None)


class FakeState:
    """Enough of discord.py's ConnectionState for ``discord.Attachment``."""

    http = None


def attachment(name: str, size: int, content_type: str | None, *, voice: bool = False, aid: int = 1) -> Any:
    data: dict[str, Any] = {"id": aid, "filename": name, "size": size, "url": f"http://cdn/{name}?ex=1",
                            "proxy_url": "", "content_type": content_type}
    if voice:
        data |= {"duration_secs": 2.0, "waveform": "AAAA"}
    return discord.Attachment(data=data, state=FakeState())  # type: ignore[arg-type]


def message(*attachments: Any, reference: Any = None, embeds: tuple = (), stickers: tuple = ()) -> Any:
    return SimpleNamespace(id=10, channel=SimpleNamespace(id=20), attachments=list(attachments),
                           embeds=list(embeds), stickers=list(stickers), reference=reference)


def test_files_within_the_limits_become_refs_with_kind_type_and_where_to_find_them() -> None:
    found = collect(message(attachment("cat.png", 100, "image/png"),
                            attachment("main.py", 50, None, aid=2),
                            attachment("voice-message.ogg", 80, "audio/ogg", voice=True, aid=3)), CONFIG)
    assert [(f.name, f.kind, f.mime, f.message_id, f.channel_id, f.key) for f in found.files] == [
        ("cat.png", "image", "image/png", 10, 20, "1"),
        ("main.py", "text", "text/plain", 10, 20, "2"),
        ("voice-message.ogg", "audio", "audio/ogg", 10, 20, "3"),
    ]
    assert found.files[2].voice and found.files[2].label == "your voice message"
    assert found.refused == ()
    payload = found.payload()
    assert payload["files"][0]["url"] == "http://cdn/cat.png?ex=1"


def test_each_file_over_a_limit_or_of_an_unknown_kind_gets_a_sentence_naming_it_and_the_limit() -> None:
    cfg = load_config(environ={"ATTACHMENT_MAX_FILE_BYTES": "1000", "ATTACHMENT_MAX_MESSAGE_BYTES": "1500",
                               "ATTACHMENT_MAX_COUNT": "2", "ATTACHMENT_TYPES": "image,text"}, env_file=None)
    found = collect(message(
        attachment("a.png", 900, "image/png", aid=1),
        attachment("big.png", 5000, "image/png", aid=2),
        attachment("b.png", 900, "image/png", aid=3),
        attachment("song.mp3", 10, "audio/mpeg", aid=4),
        attachment("x.bin", 10, "application/octet-stream", aid=5),
        attachment("c.txt", 10, "text/plain", aid=6),
        attachment("d.txt", 10, "text/plain", aid=7),
    ), cfg)
    assert [f.name for f in found.files] == ["a.png", "c.txt"]
    assert found.refused == (
        texts.attachment_too_large("big.png", 5000, 1000),
        texts.attachment_total_too_large("b.png", 1500),
        texts.attachment_kind_off("song.mp3", "audio file"),
        texts.attachment_unknown_type("x.bin"),
        texts.attachment_too_many("d.txt", 2),
    )
    assert "4.9 KB" in found.refused[0] and "1,000 bytes" in found.refused[0]


def test_a_message_without_files_costs_nothing_and_is_empty() -> None:
    found = collect(message(), CONFIG)
    assert found.empty and found.payload() == {}


@pytest.mark.parametrize(
    ("name", "content_type", "kind", "mime"),
    [
        ("a.jpg", "image/jpeg", "image", "image/jpeg"),
        ("a.gif", "image/gif", "image", "image/gif"),
        ("a.mp3", "audio/mpeg", "audio", "audio/mp3"),
        ("a.wav", "audio/x-wav", "audio", "audio/wav"),
        ("a.mov", "video/quicktime", "video", "video/mov"),
        ("a.pdf", None, "pdf", "application/pdf"),
        ("Dockerfile", None, "text", "text/plain"),
        ("data.json", "application/json", "text", "text/plain"),
        ("a.exe", "application/x-msdownload", None, "application/x-msdownload"),
    ],
)
def test_files_are_classified_by_type_and_name(
    name: str, content_type: str | None, kind: str, mime: str
) -> None:
    assert classify_file(name, content_type) == (kind, mime)


def test_bytes_are_checked_against_their_declared_type() -> None:
    assert looks_like("image", "image/png", b"\x89PNG\r\n\x1a\n....")
    assert not looks_like("image", "image/png", b"GIF89a")
    assert looks_like("pdf", "application/pdf", b"%PDF-1.7")
    assert not looks_like("pdf", "application/pdf", b"<html>")
    assert looks_like("audio", "audio/ogg", b"OggS\x00")
    assert looks_like("audio", "audio/mp3", b"ID3\x03")
    assert looks_like("video", "video/mp4", b"\x00\x00\x00\x18ftypmp42")
    assert decode_text("héllo".encode()) == "héllo"
    assert decode_text("hi".encode("utf-16")) == "hi"
    assert decode_text(b"\x00\x01binary") is None


def test_a_signed_url_expires_at_its_ex() -> None:
    assert url_expired("https://cdn/x.png?ex=65d903de&is=65c68ede&hm=ab", now=0x65D903DE)
    assert not url_expired("https://cdn/x.png?ex=65d903de&is=65c68ede&hm=ab", now=0x65D903DD)
    assert not url_expired("https://cdn/x.png", now=1e12)


def test_the_spool_keeps_at_most_its_bound_dropping_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=250)
    spool.put("1", b"a" * 100)
    spool.put("2", b"b" * 100)
    spool.put("3", b"c" * 100)  # 300 > 250: "1" goes
    assert spool.get("1") is None and spool.get("2") == b"b" * 100 and spool.get("3") == b"c" * 100
    assert spool.used == 200
    spool.put("4", b"d" * 500)  # larger than the whole spool: not kept, nothing evicted
    assert spool.get("4") is None and spool.used == 200
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "spool" / "3").stat().st_mode & 0o777 == 0o600
    again = Spool(tmp_path / "spool", max_bytes=250)  # a restart finds what was kept
    assert again.get("3") == b"c" * 100
    with pytest.raises(ValueError):
        spool.put("../escape", b"x")


def test_a_spool_of_zero_bytes_keeps_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=0)
    spool.put("1", b"a")
    assert spool.get("1") is None


def tiny_gif() -> bytes:
    """A 2x2 GIF with a red and a blue pixel per row (LZW with a clear code before every pixel)."""
    codes = []
    for index in (0, 1, 1, 0):
        codes += [4, index]
    codes.append(5)
    bits = value = 0
    out = bytearray()
    for code in codes:
        value |= code << bits
        bits += 3
        while bits >= 8:
            out.append(value & 0xFF)
            value >>= 8
            bits -= 8
    if bits:
        out.append(value)
    palette = b"\xff\x00\x00" + b"\x00\x00\xff" + b"\x00\x00\x00" * 2
    return (b"GIF89a" + (2).to_bytes(2, "little") * 2 + b"\x81\x00\x00" + palette
            + b"\x2c" + bytes(4) + (2).to_bytes(2, "little") * 2 + b"\x00"
            + b"\x02" + bytes([len(out)]) + bytes(out) + b"\x00;")


def test_the_gif_first_frame_is_a_png_of_its_pixels() -> None:
    png = first_frame_png(tiny_gif())
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    raw = zlib.decompress(png[png.index(b"IDAT") + 4:])
    rows = [raw[i * 9 + 1: (i + 1) * 9] for i in range(2)]
    assert rows == [b"\xff\x00\x00\xff\x00\x00\xff\xff", b"\x00\x00\xff\xff\xff\x00\x00\xff"]



def test_a_damaged_gif_is_refused() -> None:
    with pytest.raises(GifError):
        first_frame_png(b"GIF89a\x02\x00")
    with pytest.raises(GifError):
        first_frame_png(b"\x89PNG")
