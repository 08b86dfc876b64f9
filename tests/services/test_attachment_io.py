"""The services attachments use, against the emulators: ``DiscordIO.download`` (a bounded read of
a CDN file through ``discord.read``) and ``GeminiFiles`` (upload, then a bounded wait for ACTIVE,
behind its own breaker). Time is a ``FakeClock``: the waits between polls are recorded, not slept."""

from __future__ import annotations

from collections.abc import AsyncIterator

import discord
import pytest

from resilience.breakers import BreakerBoard, BreakerState
from resilience.clock import FakeClock
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import GeminiEmulator
from services.discord_io import DiscordIO, DownloadTooLargeError
from services.gemini import FILES_BREAKER, FileNotReadyError, GeminiFiles, GeminiService

PNG = b"\x89PNG\r\n\x1a\n" + bytes(5000)


@pytest.fixture
async def cdn() -> AsyncIterator[tuple[DiscordEmulator, DiscordIO, BreakerBoard]]:
    async with DiscordEmulator() as emu:
        board = BreakerBoard(FakeClock(), fail_max=2, reset_timeout=30)
        io = DiscordIO(board, timeout=5)
        yield emu, io, board
        await io.stop()


async def posted_url(emu: DiscordEmulator) -> str:
    msg = await emu.send_user_message(
        emu.channels["general"], attachments=[{"filename": "a.png", "content_type": "image/png", "data": PNG}]
    )
    return str(msg["attachments"][0]["url"])


async def test_a_download_reads_the_file_and_gives_up_past_its_byte_bound(cdn) -> None:
    emu, io, board = cdn
    url = await posted_url(emu)
    assert await io.download(url, max_bytes=len(PNG)) == PNG
    with pytest.raises(DownloadTooLargeError):
        await io.download(url, max_bytes=len(PNG) - 1)
    assert board["discord.read"].failures == 0  # a file too large is not Discord's failure


async def test_an_expired_url_is_not_found_and_never_counts_against_discord_read(cdn) -> None:
    emu, io, board = cdn
    url = await posted_url(emu)
    emu.world.cdn_clock = lambda: 4_000_000_000.0
    for _ in range(3):
        with pytest.raises(discord.NotFound):
            await io.download(url, max_bytes=10**6)
    assert board["discord.read"].state is BreakerState.CLOSED and board["discord.read"].failures == 0


async def test_a_failing_cdn_counts_and_opens_discord_read(cdn) -> None:
    emu, io, board = cdn
    url = await posted_url(emu)
    emu.faults.add("503", target="cdn")
    for _ in range(2):
        with pytest.raises(discord.DiscordServerError):
            await io.download(url, max_bytes=10**6)
    assert board["discord.read"].state is BreakerState.OPEN


@pytest.fixture
async def files() -> AsyncIterator[tuple[GeminiEmulator, GeminiFiles, BreakerBoard, FakeClock]]:
    clock = FakeClock()
    async with GeminiEmulator(api_key="k") as emu:
        board = BreakerBoard(clock, fail_max=2, reset_timeout=30)
        gemini = GeminiService(
            api_key="k", model="gemini-2.5-flash", base_url=emu.base_url, persona="p",
            breaker=board.add("gemini"), retry=RetryPolicy("gemini", max_attempts=1, sleep=clock.sleep),
            timeout=AdaptiveTimeout(5, minimum=1, maximum=5, clock=clock), clock=clock,
        )
        await gemini.start()
        service = GeminiFiles(gemini, board.add(FILES_BREAKER), clock=clock, timeout=5, max_wait=10, poll=1)
        yield emu, service, board, clock
        await gemini.stop()


async def test_an_upload_waits_for_active_polling_on_the_clock(files) -> None:
    emu, service, _, clock = files
    uploaded = await service.upload(b"\x00\x00\x00\x18ftypmp42" + bytes(100), "video/mp4", "clip.mp4")
    assert uploaded.uri.startswith(emu.base_url + "/v1beta/files/") and uploaded.mime_type == "video/mp4"
    assert uploaded.expires_at is not None
    assert clock.sleeps == [1, 1]  # PROCESSING twice (the emulator's video), then ACTIVE
    assert [r.action for r in emu.requests] == ["upload_start", "upload", "files.get", "files.get"]


async def test_a_file_stuck_processing_raises_after_the_bounded_wait(files) -> None:
    emu, service, board, clock = files
    emu.faults.add("stuck_processing", target="files", count=1)
    with pytest.raises(FileNotReadyError):
        await service.upload(PNG, "image/png", "a.png")
    assert sum(clock.sleeps) <= 10 and len(clock.sleeps) == 10
    assert board["gemini"].failures == 0 and board[FILES_BREAKER].state is BreakerState.CLOSED


async def test_upload_failures_count_against_their_own_breaker_not_geminis(files) -> None:
    emu, service, board, _ = files
    emu.faults.add("upload_500", target="files", count=2)
    for _ in range(2):
        with pytest.raises(Exception) as caught:
            await service.upload(PNG, "image/png", "a.png")
        assert getattr(caught.value, "code", None) == 500
    assert board[FILES_BREAKER].state is BreakerState.OPEN
    assert board["gemini"].state is BreakerState.CLOSED and board["gemini"].failures == 0
    assert [r.action for r in emu.requests] == ["upload_start", "upload_start"]  # no hidden retry
