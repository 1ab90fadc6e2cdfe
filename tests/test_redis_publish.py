"""The Redis bus's own pipelined publish connection (events/redis_publish.py), on real
Redis: concurrent publishes share it, a flushed script cache and a killed connection are
survived, and URLs it cannot serve stay on redis-py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agent_orchestrator.events.models import Event
from agent_orchestrator.events.redis import RedisEventBus
from agent_orchestrator.events.redis_publish import ScriptPublisher
from tests.conftest import REDIS_URL


@pytest.fixture
async def named(redis_namespace: str) -> AsyncIterator[tuple[RedisEventBus, Redis, str]]:
    """A bus whose connections carry a unique client name, and an admin client."""
    name = f"aotest-pub-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(REDIS_URL, client_name=name)
    admin = Redis.from_url(REDIS_URL, decode_responses=True)
    bus = RedisEventBus(redis, namespace=redis_namespace, stream_cap=1000, ttl_seconds=60)
    yield bus, admin, name
    await bus.close()
    await redis.aclose()
    await admin.aclose()


def event(n: int, task_id: str = "t-1") -> Event:
    return Event(type="chat.stream", tenant_id="acme", task_id=task_id, data={"n": n})


async def connections_named(admin: Redis, name: str) -> list[str]:
    clients = await admin.client_list()
    return [str(client["id"]) for client in clients if client.get("name") == name]


async def test_concurrent_publishes_share_one_connection(
    named: tuple[RedisEventBus, Redis, str],
) -> None:
    bus, admin, name = named
    stamped = await asyncio.gather(*(bus.publish(event(n)) for n in range(200)))
    ids = [e.cursor for e in stamped]
    assert len(set(ids)) == 200
    assert [e.data["n"] for e in sorted(stamped, key=lambda e: e.cursor)] == list(range(200))
    assert len(await connections_named(admin, name)) == 1
    replayed = await bus.replay(stamped[0].streams()[0], None, 1000)
    assert [e.cursor for e in replayed] == sorted(ids)


async def test_a_flushed_script_cache_is_survived(named: tuple[RedisEventBus, Redis, str]) -> None:
    bus, admin, _ = named
    first = await bus.publish(event(1))
    await admin.script_flush()
    second = await bus.publish(event(2))
    assert second.cursor > first.cursor


async def test_a_killed_connection_is_replaced(named: tuple[RedisEventBus, Redis, str]) -> None:
    bus, admin, name = named
    first = await bus.publish(event(1))
    (killed,) = await connections_named(admin, name)
    await admin.execute_command("CLIENT", "KILL", "ID", killed)
    second = await bus.publish(event(2))
    assert second.cursor > first.cursor
    assert await connections_named(admin, name) not in ([], [killed])


def test_urls_it_cannot_serve_stay_on_redis_py() -> None:
    script = "return 1"
    assert ScriptPublisher.for_client(Redis.from_url("redis://127.0.0.1:6379/2"), script)
    assert ScriptPublisher.for_client(Redis.from_url("rediss://127.0.0.1:6379/0"), script) is None
    assert ScriptPublisher.for_client(Redis.from_url("unix:///tmp/redis.sock"), script) is None


async def test_the_urls_credentials_are_sent_first() -> None:
    publisher = ScriptPublisher.for_client(
        Redis.from_url(REDIS_URL, password="not-the-password"), "return 1"
    )
    assert publisher is not None
    # A wrong password (or one for a Redis that has none) fails the publish: it is never
    # sent on a connection that skipped AUTH.
    with pytest.raises(ResponseError, match=r"(?i)auth|wrongpass|password"):
        await publisher.run([], [])
    await publisher.aclose()
