"""The session hot copy: in Redis with the session's TTL in production mode, in process in
embedded mode; the database stays the truth, so losing the copy loses nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from agent_orchestrator.config import Settings
from agent_orchestrator.events.models import Event, EventType, StreamKey
from tests.chat_helpers import chat
from tests.conftest import REDIS_URL, TcpProxy, TokenFactory, auth, redis_url, running_app

SESSIONS = "/api/v1/sessions"


async def _create(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> Any:
    response = await client.post(SESSIONS, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_redis_hot_copy_follows_the_session(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    headers = auth(make_token(tenant="tenant-a"))
    session = await _create(client, headers, metadata={"v": 1})
    key = f"{settings.redis_namespace}:session:tenant-a:{session['id']}"
    redis = Redis.from_url(REDIS_URL)
    try:
        ttl = await redis.ttl(key)
        assert settings.session_ttl - 5 <= ttl <= settings.session_ttl
        assert json.loads(await redis.get(key) or b"null")["metadata"] == {"v": 1}

        patched = await client.patch(
            f"{SESSIONS}/{session['id']}", json={"metadata": {"v": 2}}, headers=headers
        )
        assert patched.status_code == 200
        assert json.loads(await redis.get(key) or b"null")["metadata"] == {"v": 2}
        assert await redis.ttl(key) >= settings.session_ttl - 5

        # Losing the copy loses nothing: the read goes to the database and refills it.
        await redis.delete(key)
        read = await client.get(f"{SESSIONS}/{session['id']}", headers=headers)
        assert read.status_code == 200
        assert read.json() == patched.json()
        assert await redis.exists(key) == 1

        closed = await client.delete(f"{SESSIONS}/{session['id']}", headers=headers)
        assert closed.status_code == 200
        assert await redis.exists(key) == 0
        read = await client.get(f"{SESSIONS}/{session['id']}", headers=headers)
        assert read.json()["state"] == "closed"
        assert await redis.exists(key) == 0, "a closed session gets no hot copy"
    finally:
        await redis.aclose()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_in_process_hot_copy_in_embedded_mode(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token(tenant="tenant-a"))
    session = await _create(client, headers, metadata={"v": 1})
    cache = client.app.state.core.sessions.cache  # type: ignore[attr-defined]
    assert client.app.state.core.redis is None  # type: ignore[attr-defined]

    cached = await cache.get("tenant-a", session["id"])
    assert cached is not None
    assert cached.model_dump(mode="json") == session
    assert await cache.get("tenant-b", session["id"]) is None, "keyed by tenant"

    await client.delete(f"{SESSIONS}/{session['id']}", headers=headers)
    assert await cache.get("tenant-a", session["id"]) is None


@pytest.mark.parametrize("backend", ["sqlite"])  # the database here; Redis via the proxy
async def test_sessions_keep_working_while_redis_is_down(
    make_settings: Callable[..., Settings],
    make_token: TokenFactory,
    redis_proxy: TcpProxy,
    redis_namespace: str,
) -> None:
    settings = make_settings(redis_uri=redis_url(redis_proxy), redis_namespace=redis_namespace)
    headers = auth(make_token(tenant="tenant-a"))
    with capture_logs() as logs:
        async with running_app(settings) as client:
            session = await _create(client, headers, metadata={"v": 1})
            await redis_proxy.cut()

            read = await client.get(f"{SESSIONS}/{session['id']}", headers=headers)
            assert read.status_code == 200, read.text
            assert read.json() == session
            listed = await client.get(SESSIONS, headers=headers)
            assert [item["id"] for item in listed.json()["items"]] == [session["id"]]
            patched = await client.patch(
                f"{SESSIONS}/{session['id']}", json={"metadata": {"v": 2}}, headers=headers
            )
            assert patched.status_code == 200, patched.text
            assert patched.json()["metadata"] == {"v": 2}
            other = await _create(client, headers)
            assert other["state"] == "active"
            await redis_proxy.start()
    assert any(str(entry["event"]).startswith("session hot copy") for entry in logs)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_turns_session_events_find_the_hot_copy_already_in_their_state(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    """The worker sets the hot copy in the publish of the session's state event (one
    Redis round trip for both): whoever sees `processing` or `active` reads it too."""
    headers = auth(make_token(tenant="tenant-a"))
    session = await _create(client, headers)
    key = f"{settings.redis_namespace}:session:tenant-a:{session['id']}"
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    seen: list[tuple[str, str, int]] = []
    async with Redis.from_url(REDIS_URL) as redis:

        async def follow(live: AsyncIterator[Event]) -> None:
            async for event in live:
                if event.type == EventType.SESSION_STATE:
                    copy = json.loads(await redis.get(key) or b"null")
                    seen.append((event.data["state"], copy["state"], await redis.ttl(key)))
                    if event.data["state"] == "active":
                        return

        stream = StreamKey("session", "tenant-a", session["id"])
        async with bus.subscribe(stream, replay=False) as live:
            follower = asyncio.create_task(follow(live))
            await asyncio.sleep(0)
            body = {"message": "hi", "session_id": session["id"], "mode": "wait"}
            await chat(client, headers, expect=200, **body)
            await asyncio.wait_for(follower, 5)
    assert [(event, copy) for event, copy, _ in seen] == [
        ("processing", "processing"),
        ("active", "active"),
    ]
    assert all(settings.session_ttl - 5 <= ttl <= settings.session_ttl for *_, ttl in seen)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_session_made_by_a_chat_turn_gets_its_hot_copy_from_the_worker(
    client: httpx.AsyncClient,
    make_token: TokenFactory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API writes none for it (it could land after the worker's `processing`); the
    worker's claim and the turn's end do, with their events' publishes, so the copy is
    there and says `active`."""
    cache = client.app.state.core.sessions.cache  # type: ignore[attr-defined]
    written_alone: list[str] = []
    put = cache.put

    async def noted_put(session: Any, ttl_seconds: int) -> None:
        written_alone.append(str(session.id))
        await put(session, ttl_seconds)

    monkeypatch.setattr(cache, "put", noted_put)
    headers = auth(make_token(tenant="tenant-a"))
    body = await chat(client, headers, expect=200, message="hi", mode="wait")
    assert written_alone == []  # no SET of its own, from the API or the worker
    key = f"{settings.redis_namespace}:session:tenant-a:{body['task']['session_id']}"
    async with Redis.from_url(REDIS_URL) as redis:
        copy = json.loads(await redis.get(key) or b"null")
        ttl = await redis.ttl(key)
    assert copy["state"] == "active"
    assert copy["id"] == body["task"]["session_id"]
    assert settings.session_ttl - 5 <= ttl <= settings.session_ttl
