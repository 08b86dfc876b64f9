"""The Gemini emulator's context caches and embeddings, with the real google-genai client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import errors, types

from sandbox.gemini import GeminiEmulator
from sandbox.gemini_caches import bag_of_words
from services.gemini import close_client, new_client

LONG = "word " * 5000  # 25,000 characters: 6,250 tokens


@pytest.fixture
async def emu() -> AsyncIterator[GeminiEmulator]:
    async with GeminiEmulator() as emulator:
        yield emulator


@pytest.fixture
async def client(emu: GeminiEmulator) -> AsyncIterator[genai.Client]:
    c = new_client("sandbox-key", emu.base_url, 5.0)
    yield c
    await close_client(c)


async def create(
    client: genai.Client, persona: str = LONG, model: str = "gemini-2.5-flash"
) -> types.CachedContent:
    return await client.aio.caches.create(
        model=model, config=types.CreateCachedContentConfig(system_instruction=persona, ttl="300s")
    )


async def test_a_cache_is_created_read_used_and_deleted(emu, client) -> None:
    cache = await create(client)
    assert cache.name and cache.usage_metadata and cache.usage_metadata.total_token_count == 6250
    assert (await client.aio.caches.get(name=cache.name)).name == cache.name
    reply = await client.aio.models.generate_content(
        model="gemini-2.5-flash",
        contents="hello",
        config=types.GenerateContentConfig(cached_content=cache.name),
    )
    assert reply.text and reply.usage_metadata and reply.usage_metadata.cached_content_token_count == 6250
    await client.aio.caches.delete(name=cache.name)
    with pytest.raises(errors.ClientError) as info:
        await client.aio.caches.get(name=cache.name)
    assert info.value.code == 403 and "CachedContent not found" in str(info.value.message)


async def test_a_cache_expires_after_its_ttl(emu, client) -> None:
    now = [1_000_000.0]
    emu.caches.clock = lambda: now[0]
    cache = await create(client)
    now[0] += 301
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(
            model="gemini-2.5-flash",
            contents="hi",
            config=types.GenerateContentConfig(cached_content=cache.name),
        )
    assert info.value.code == 403


async def test_refusals_too_small_with_a_system_instruction_or_another_model(emu, client) -> None:
    with pytest.raises(errors.ClientError, match="too small"):
        await create(client, "You are short.")
    with pytest.raises(errors.ClientError, match="too small"):
        await create(client, "word " * 2000, model="gemini-2.5-pro")  # 2,500 tokens: under Pro's 4,096
    cache = await create(client)
    with pytest.raises(errors.ClientError, match="system_instruction, tools or tool_config"):
        await client.aio.models.generate_content(
            model="gemini-2.5-flash",
            contents="hi",
            config=types.GenerateContentConfig(cached_content=cache.name, system_instruction="also me"),
        )
    with pytest.raises(errors.ClientError, match="has to be the same"):
        await client.aio.models.generate_content(
            model="gemini-2.5-pro",
            contents="hi",
            config=types.GenerateContentConfig(cached_content=cache.name),
        )


def test_bag_of_words_embeddings_are_normalised_and_share_words() -> None:
    a, b, c = (
        bag_of_words("My cat is called Zanzibar", 256),
        bag_of_words("what IS my cat called?", 256),
        bag_of_words("", 256),
    )
    assert abs(sum(x * x for x in a) - 1) < 1e-5 and c == [0.0] * 256
    assert round(sum(x * y for x, y in zip(a, b, strict=True)), 2) == 0.8


async def test_an_embeddings_fault_hits_embeddings_only(emu, client) -> None:
    emu.faults.add("503", "embeddings")
    assert (await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hello")).text
    with pytest.raises(errors.ServerError):
        await client.aio.models.embed_content(model="gemini-embedding-001", contents=["x"])


def test_the_console_fault_command_can_target_embeddings_only() -> None:
    from sandbox.console import parse_fault
    from sandbox.gemini import FAULT_KINDS

    spec = parse_fault(["503", "embeddings", "next", "2"], FAULT_KINDS)
    assert spec["kind"] == "503" and spec["target"] == "embeddings" and spec["count"] == 2
