"""The Redis bus's publishes through redis-py on a client of their own
(events/script_batch.py), on real Redis: concurrent publishes share round trips and keep
their order, and a flushed script cache, a killed connection and a Redis that went away
and came back are survived."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from agent_orchestrator.events.models import Event
from agent_orchestrator.events.redis import RedisEventBus
from tests.conftest import REDIS_URL, TcpProxy

pytestmark = pytest.mark.redis


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


async def test_concurrent_publishes_keep_their_order_on_two_connections(
    named: tuple[RedisEventBus, Redis, str],
) -> None:
    bus, admin, name = named
    stamped = await asyncio.gather(*(bus.publish(event(n)) for n in range(200)))
    ids = [e.cursor for e in stamped]
    assert ids == sorted(ids)  # in call order
    assert len(set(ids)) == 200
    assert 1 <= len(await connections_named(admin, name)) <= 2  # single calls, batches
    replayed = await bus.replay(stamped[0].streams()[0], None, 1000)
    assert [e.data["n"] for e in replayed] == list(range(200))


async def test_sequential_publishes_rise(named: tuple[RedisEventBus, Redis, str]) -> None:
    bus, _, _ = named
    ids = [(await bus.publish(event(n))).cursor for n in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


@pytest.mark.parametrize("together", [1, 20], ids=["alone", "batched"])
async def test_a_flushed_script_cache_is_survived(
    named: tuple[RedisEventBus, Redis, str], together: int
) -> None:
    bus, admin, _ = named
    await asyncio.gather(*(bus.publish(event(n)) for n in range(together)))
    first = await bus.publish(event(0))
    await admin.script_flush()
    later = await asyncio.gather(*(bus.publish(event(n)) for n in range(together)))
    assert all(e.cursor > first.cursor for e in later)
    # ... and the publishes after the flush really were written, in order.
    replayed = await bus.replay(first.streams()[0], first.cursor, 1000)
    assert [e.cursor for e in replayed] == [e.cursor for e in later]


async def test_a_killed_connection_is_replaced(named: tuple[RedisEventBus, Redis, str]) -> None:
    bus, admin, name = named
    first = await bus.publish(event(1))
    killed = await connections_named(admin, name)
    assert killed, "no connection of the bus to kill: the test would prove nothing"
    for client_id in killed:
        await admin.execute_command("CLIENT", "KILL", "ID", client_id)
    second = await bus.publish(event(2))
    assert second.cursor > first.cursor
    now = await connections_named(admin, name)
    assert now, "the publish went over no connection of the bus"
    assert not set(now) & set(killed)
    replayed = await bus.replay(first.streams()[0], None, 10)
    assert [e.cursor for e in replayed] == [first.cursor, second.cursor]


async def test_publishes_resume_after_redis_comes_back(redis_namespace: str) -> None:
    target = urlsplit(REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    redis = Redis.from_url(f"redis://127.0.0.1:{proxy.port}{target.path}")
    bus = RedisEventBus(redis, namespace=redis_namespace, stream_cap=1000, ttl_seconds=60)
    try:
        first = await bus.publish(event(1))
        await proxy.cut()
        with pytest.raises(Exception):  # noqa: B017 - redis-py's ConnectionError, after retries
            await bus.publish(event(2))
        await proxy.start()  # the same port again
        stamped = await asyncio.gather(*(bus.publish(event(n)) for n in range(3, 13)))
        assert all(e.cursor > first.cursor for e in stamped)
        replayed = await bus.replay(first.streams()[0], None, 100)
        assert [e.data["n"] for e in replayed] == [1, *range(3, 13)]  # written, in order
    finally:
        await bus.close()
        await redis.aclose()
        await proxy.close()
