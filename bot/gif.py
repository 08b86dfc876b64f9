"""The first frame of a GIF as a PNG: Gemini reads PNG, JPEG, WebP, HEIC and HEIF images, not GIF
(https://ai.google.dev/gemini-api/docs/image-understanding, "Supported image formats").

Pure Python (GIF89a's LZW, then a zlib-compressed RGBA PNG), bounded by ``MAX_PIXELS``; a file
that is not a well-formed GIF raises ``GifError``. Layout per the GIF89a specification
(w3.org/Graphics/GIF/spec-gif89a.txt) and PNG (RFC 2083).
"""

from __future__ import annotations

import struct
import zlib

MAX_PIXELS = 4_000_000  # a 2000 x 2000 frame; larger ones are refused, not decoded
_TRAILER, _EXTENSION, _IMAGE = 0x3B, 0x21, 0x2C
_GRAPHIC_CONTROL = 0xF9


class GifError(ValueError):
    """Not a GIF the bot can read (damaged, truncated, or too large)."""


def first_frame_png(data: bytes) -> bytes:
    """The first image of the GIF ``data``, as PNG bytes (RGBA; its transparent colour kept)."""
    try:
        return _convert(data)
    except (IndexError, struct.error) as exc:
        raise GifError("truncated GIF") from exc


def _convert(data: bytes) -> bytes:
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise GifError("not a GIF")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13
    palette = b""
    if flags & 0x80:
        size = 3 << ((flags & 7) + 1)
        palette, pos = data[pos : pos + size], pos + size
    transparent: int | None = None
    while True:
        block = data[pos]
        pos += 1
        if block == _TRAILER:
            raise GifError("a GIF without an image")
        if block == _EXTENSION:
            label = data[pos]
            pos += 1
            if label == _GRAPHIC_CONTROL and data[pos] >= 4 and data[pos + 1] & 1:
                transparent = data[pos + 4]
            while data[pos]:
                pos += data[pos] + 1
            pos += 1
            continue
        if block != _IMAGE:
            raise GifError("unexpected block in GIF")
        left, top, w, h, iflags = struct.unpack_from("<HHHHB", data, pos)
        pos += 9
        if iflags & 0x80:
            size = 3 << ((iflags & 7) + 1)
            palette, pos = data[pos : pos + size], pos + size
        break
    if not width or not height or width * height > MAX_PIXELS or w * h > MAX_PIXELS:
        raise GifError("GIF frame too large or empty")
    min_size = data[pos]
    pos += 1
    stream = bytearray()
    while data[pos]:
        stream += data[pos + 1 : pos + 1 + data[pos]]
        pos += data[pos] + 1
    indices = _lzw(bytes(stream), min_size, w * h)
    if iflags & 0x40:
        indices = _deinterlace(indices, w, h)
    colours = len(palette) // 3
    canvas = bytearray(width * height * 4)  # transparent black outside the frame
    for y in range(min(h, height - top)):
        row = (top + y) * width
        for x in range(min(w, width - left)):
            index = indices[y * w + x]
            if index == transparent or index >= colours:
                continue
            at = (row + left + x) * 4
            canvas[at : at + 4] = palette[index * 3 : index * 3 + 3] + b"\xff"
    return _png(width, height, bytes(canvas))


def _lzw(stream: bytes, min_size: int, count: int) -> bytes:
    """Decode GIF LZW ``stream`` into at most ``count`` colour indices (padded with 0)."""
    if not 2 <= min_size <= 8:
        raise GifError("bad LZW code size")
    clear, end = 1 << min_size, (1 << min_size) + 1
    table: list[bytes] = []
    width = min_size + 1
    out = bytearray()
    previous: bytes | None = None
    bits = value = 0
    for byte in stream:
        value |= byte << bits
        bits += 8
        while bits >= width:
            code = value & ((1 << width) - 1)
            value >>= width
            bits -= width
            if code == clear:
                table = [bytes([i]) for i in range(clear)] + [b"", b""]
                width, previous = min_size + 1, None
                continue
            if code == end or not table:
                return bytes(out[:count]).ljust(count, b"\0")
            if code < len(table):
                entry = table[code]
                if previous is not None:
                    table.append(previous + entry[:1])
            elif code == len(table) and previous is not None:
                entry = previous + previous[:1]
                table.append(entry)
            else:
                raise GifError("bad LZW code")
            out += entry
            previous = entry
            if len(table) == (1 << width) and width < 12:
                width += 1
            if len(out) >= count:
                return bytes(out[:count])
    return bytes(out[:count]).ljust(count, b"\0")


def _deinterlace(indices: bytes, w: int, h: int) -> bytes:
    rows = [indices[i * w : (i + 1) * w] for i in range(h)]
    order = [y for start, step in ((0, 8), (4, 8), (2, 4), (1, 2)) for y in range(start, h, step)]
    out = [b""] * h
    for source, target in enumerate(order):
        out[target] = rows[source]
    return b"".join(out)


def _png(width: int, height: int, rgba: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    stride = width * 4
    raw = b"".join(b"\0" + rgba[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(
        b"IEND", b""
    )
