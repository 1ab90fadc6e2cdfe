"""The once-keys (services/once_keys.py) behave alike in memory and in Redis: a key is
claimed once within its time, a released claim can be made again, an expired one too;
and a publish that fails releases its Idempotency-Key, so the service's retry goes out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from agent_orchestrator.services.once_keys import MemoryOnceKeys, OnceKeys, RedisOnceKeys
from tests.chat_helpers import chat
from tests.conftest import REDIS_URL, SERVICE_TOKEN, TokenFactory, auth


@pytest.fixture(params=["memory", "redis"])
async def once(request: pytest.FixtureRequest) -> AsyncIterator[OnceKeys]:
    if request.param == "memory":
        yield MemoryOnceKeys(capacity=3)
        return
    redis = Redis.from_url(REDIS_URL)
    namespace = f"test-once-{uuid.uuid4().hex[:8]}"
    try:
        yield RedisOnceKeys(redis, namespace)
    finally:
        keys = [key async for key in redis.scan_iter(f"{namespace}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_a_key_is_claimed_once(once: OnceKeys) -> None:
    assert await once.claim("a", 60) is True
    assert await once.claim("a", 60) is False
    assert await once.claim("b", 60) is True


async def test_a_released_key_can_be_claimed_again(once: OnceKeys) -> None:
    assert await once.claim("a", 60) is True
    await once.release("a")
    assert await once.claim("a", 60) is True
    await once.release("never-claimed")  # nothing to forget: no error


async def test_a_claim_expires_with_its_time(once: OnceKeys) -> None:
    assert await once.claim("a", 1) is True
    await asyncio.sleep(1.2)
    assert await once.claim("a", 60) is True


async def test_memory_keeps_its_newest_claims_within_capacity() -> None:
    once = MemoryOnceKeys(capacity=3)
    for key in "abcd":
        assert await once.claim(key, 60)
    assert await once.claim("a", 60) is True  # the oldest was let go
    assert await once.claim("d", 60) is False


async def test_a_failed_publish_releases_its_idempotency_key(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = await chat(client, auth(make_token()), expect=200, message="hi", mode="wait")
    url = f"/internal/v1/sessions/{answer['task']['session_id']}/events"
    headers = {
        "Authorization": f"Bearer {SERVICE_TOKEN}",
        "X-Tenant-ID": "tenant-a",
        "Idempotency-Key": "cb-1",
    }
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    original = bus.publish

    async def unavailable(event: Any) -> Any:
        raise ConnectionError("the event bus is away")

    monkeypatch.setattr(bus, "publish", unavailable)
    # The 500 the app sends, not the exception the in-process transport would re-raise.
    transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as plain:
        failed = await plain.post(url, json={"type": "tool.result"}, headers=headers)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "internal_error"
    monkeypatch.setattr(bus, "publish", original)
    retried = await client.post(url, json={"type": "tool.result"}, headers=headers)
    assert retried.status_code == 202, retried.text
    assert retried.json()["duplicate"] is False
