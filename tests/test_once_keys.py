"""The once-keys (services/once_keys.py) behave alike in memory and in Redis: a key is
claimed once within its time, then holds its recorded outcome; a released claim can be
made again, an expired one too. A publish that fails releases its Idempotency-Key, so the
service's retry goes out; a repeat while the first still publishes is a 409."""

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


async def test_a_claim_holds_its_outcome_once_recorded(once: OnceKeys) -> None:
    assert await once.claim("a", 60) is True
    assert await once.outcome("a") is None  # its work is still under way
    await once.record("a", "1732650000000-0", 60)
    assert await once.outcome("a") == "1732650000000-0"
    assert await once.claim("a", 60) is False  # still claimed
    await once.record("never-claimed", "x", 60)  # a released claim is not brought back
    assert await once.outcome("never-claimed") is None
    assert await once.claim("never-claimed", 60) is True


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


async def a_callback(
    client: httpx.AsyncClient, make_token: TokenFactory, key: str
) -> tuple[str, dict[str, str]]:
    """The events URL of a new session, and a service's headers with `key`."""
    answer = await chat(client, auth(make_token()), expect=200, message="hi", mode="wait")
    url = f"/internal/v1/sessions/{answer['task']['session_id']}/events"
    headers = {
        "Authorization": f"Bearer {SERVICE_TOKEN}",
        "X-Tenant-ID": "tenant-a",
        "Idempotency-Key": key,
    }
    return url, headers


async def test_a_failed_publish_releases_its_idempotency_key(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, headers = await a_callback(client, make_token, "cb-1")
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


async def test_a_repeat_while_the_first_publishes_is_a_conflict_not_a_duplicate(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request may yet fail: answering the repeat "duplicate" then would lose
    the event (the caller stops retrying). It is a 409 until the first has published."""
    url, headers = await a_callback(client, make_token, "cb-2")
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    original = bus.publish
    publishing, go_on = asyncio.Event(), asyncio.Event()

    async def slow(event: Any) -> Any:
        publishing.set()
        await go_on.wait()
        return await original(event)

    monkeypatch.setattr(bus, "publish", slow)
    first = asyncio.create_task(client.post(url, json={"type": "tool.result"}, headers=headers))
    await publishing.wait()
    repeat = await client.post(url, json={"type": "tool.result"}, headers=headers)
    assert repeat.status_code == 409, repeat.text
    assert repeat.json()["error"]["details"] == {"header": "Idempotency-Key"}
    go_on.set()
    done = await first
    assert done.status_code == 202, done.text
    again = await client.post(url, json={"type": "tool.result"}, headers=headers)
    assert again.status_code == 200
    assert again.json() == {"id": done.json()["id"], "duplicate": True}
