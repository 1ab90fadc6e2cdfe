"""One conformance suite for every EventBus: the in-process bus of embedded mode and the
Redis bus (Streams for replay, Pub/Sub for live delivery) on real Redis with a fresh
namespace per test. Then the Redis bus surviving the loss of its Pub/Sub connection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from agent_orchestrator.events.bus import (
    EventBus,
    KeyWrite,
    LocalFanout,
    SubscriberOverflow,
    subscription,
)
from agent_orchestrator.events.memory import MemoryEventBus
from agent_orchestrator.events.models import Event, StreamKey
from agent_orchestrator.events.redis import RedisEventBus
from tests.conftest import REDIS_URL

TENANT = "tenant-a"
BusFactory = Callable[..., Awaitable[EventBus]]


@pytest.fixture(params=["memory", "redis"])
def bus_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_bus(bus_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Started buses, closed at the end. Redis buses of one test share a namespace (one
    per process in production); `client_name` tags their connections."""
    namespace = request.getfixturevalue("redis_namespace") if bus_kind == "redis" else ""
    buses: list[EventBus] = []
    clients: list[Redis] = []

    async def factory(stream_cap: int = 10_000, client_name: str | None = None) -> EventBus:
        bus: EventBus
        if bus_kind == "memory":
            bus = MemoryEventBus(stream_cap=stream_cap, ttl_seconds=3600)
        else:
            redis = Redis.from_url(REDIS_URL, client_name=client_name)
            clients.append(redis)
            bus = RedisEventBus(redis, namespace=namespace, stream_cap=stream_cap, ttl_seconds=3600)
        await bus.start()
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close()
    for client in clients:
        await client.aclose()


@pytest.fixture
async def bus(make_bus: BusFactory) -> EventBus:
    return await make_bus()


def task_event(
    task_id: str,
    n: int,
    *,
    tenant: str = TENANT,
    session_id: str | None = None,
) -> Event:
    return Event(
        type="task.status",
        tenant_id=tenant,
        task_id=task_id,
        session_id=session_id,
        data={"n": n},
    )


def task_stream(task_id: str, tenant: str = TENANT) -> StreamKey:
    return StreamKey("task", tenant, task_id)


def new_id() -> str:
    return str(uuid.uuid4())


async def collect(
    bus: EventBus,
    stream: StreamKey,
    count: int,
    *,
    after: int | None = None,
    replay: bool = True,
    ready: asyncio.Event | None = None,
    timeout: float = 5.0,
) -> list[Event]:
    """Subscribe and take `count` events (fails on timeout rather than hanging)."""
    received: list[Event] = []

    async def take() -> None:
        async with bus.subscribe(stream, after, replay=replay) as events:
            if ready is not None:
                ready.set()
            async for event in events:
                received.append(event)
                if len(received) >= count:
                    return

    try:
        await asyncio.wait_for(take(), timeout)
    except TimeoutError:
        pytest.fail(f"got {len(received)} of {count} events: {[e.data for e in received]}")
    return received


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


# --- publish and replay -----------------------------------------------------------------
async def test_publish_stamps_rising_ids(bus: EventBus) -> None:
    task_id = new_id()
    published = [await bus.publish(task_event(task_id, n)) for n in range(20)]

    cursors = [event.cursor for event in published]
    assert all(event.id.isdigit() for event in published)
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == len(cursors)
    assert [event.data["n"] for event in published] == list(range(20))
    # Ids rise across streams too (one cursor resumes anywhere).
    other = await bus.publish(task_event(new_id(), 99))
    assert other.cursor > cursors[-1]


async def test_replay_whole_stream_and_after_a_cursor(bus: EventBus) -> None:
    task_id = new_id()
    published = [await bus.publish(task_event(task_id, n)) for n in range(6)]
    await bus.publish(task_event(new_id(), 100))  # another task's event stays out

    everything = await bus.replay(task_stream(task_id), None, 100)
    assert [event.id for event in everything] == [event.id for event in published]
    assert [event.data for event in everything] == [event.data for event in published]
    assert all(event.tenant_id == TENANT and event.task_id == task_id for event in everything)

    later = await bus.replay(task_stream(task_id), published[2].cursor, 100)
    assert [event.id for event in later] == [event.id for event in published[3:]]
    assert await bus.replay(task_stream(task_id), published[-1].cursor, 100) == []
    limited = await bus.replay(task_stream(task_id), None, 2)
    assert [event.id for event in limited] == [event.id for event in published[:2]]
    assert await bus.replay(task_stream(new_id()), None, 100) == []


@pytest.mark.parametrize("cursor", [2**64 - 2, 2**64 - 1, 2**64, 10**20 - 1])
async def test_a_cursor_past_any_id_replays_nothing(bus: EventBus, cursor: int) -> None:
    """A client may send any 20-digit cursor; past the largest id a stream can hold
    (Redis's are 64-bit) nothing follows it, and that is the answer, not an error."""
    task_id = new_id()
    await bus.publish(task_event(task_id, 1))
    assert await bus.replay(task_stream(task_id), cursor, 100) == []


async def test_an_event_of_a_task_and_session_is_in_both_streams(bus: EventBus) -> None:
    session_id, task_a, task_b = new_id(), new_id(), new_id()
    first = await bus.publish(task_event(task_a, 1, session_id=session_id))
    second = await bus.publish(task_event(task_b, 2, session_id=session_id))
    only_task = await bus.publish(task_event(task_a, 3))

    session_log = await bus.replay(StreamKey("session", TENANT, session_id), None, 100)
    assert [event.id for event in session_log] == [first.id, second.id]
    task_log = await bus.replay(task_stream(task_a), None, 100)
    assert [event.id for event in task_log] == [first.id, only_task.id]
    assert task_log[0].session_id == session_id

    session_after = await bus.replay(StreamKey("session", TENANT, session_id), first.cursor, 10)
    assert [event.id for event in session_after] == [second.id]


async def test_publish_many_is_publish_in_order(bus: EventBus) -> None:
    """Events published together get rising ids in the order given, each lands in its own
    streams (some in two, some in one), and a live subscriber sees them in that order."""
    session_id, task_a, task_b = new_id(), new_id(), new_id()
    before = await bus.publish(task_event(task_a, 0))
    events = [
        task_event(task_a, 1, session_id=session_id),
        task_event(task_b, 2),
        Event(type="session.state", tenant_id=TENANT, session_id=session_id, data={"n": 3}),
        task_event(task_a, 4, session_id=session_id),
    ]
    async with bus.subscribe(task_stream(task_a), before.cursor) as live:
        published = await bus.publish_many(events)
        seen = [await anext(live) for _ in range(2)]

    cursors = [event.cursor for event in published]
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == 4
    assert cursors[0] > before.cursor
    assert [event.data["n"] for event in published] == [1, 2, 3, 4]
    assert [event.id for event in seen] == [published[0].id, published[3].id]
    task_log = await bus.replay(task_stream(task_a), None, 100)
    assert [event.id for event in task_log] == [before.id, published[0].id, published[3].id]
    assert [event.id for event in await bus.replay(task_stream(task_b), None, 100)] == [
        published[1].id
    ]
    session_log = await bus.replay(StreamKey("session", TENANT, session_id), None, 100)
    assert [event.id for event in session_log] == [published[0].id, *(e.id for e in published[2:])]
    assert await bus.publish_many([]) == []
    later = await bus.publish(task_event(task_b, 5))
    assert later.cursor > cursors[-1]


async def test_a_hand_over_reaches_a_listening_process_before_the_events(
    make_bus: BusFactory, bus_kind: str
) -> None:
    """What a worker hands to a waiting request: another process's bus (the same bus in
    embedded mode) that listens gets it before the events published with it, once."""
    publisher = await make_bus()
    listener = await make_bus() if bus_kind == "redis" else publisher
    task_id = new_id()
    order: list[str] = []
    listener.on_handover(lambda key, text: order.append(f"{key} {text}"))

    async def consume(live: AsyncIterator[Event]) -> None:
        async for event in live:
            order.append(f"event {event.data['n']}")
            if event.data["n"] == 2:
                return

    async with listener.subscribe(task_stream(task_id), replay=False) as live:
        consumer = asyncio.create_task(consume(live))
        await asyncio.sleep(0)
        events = [task_event(task_id, 1), task_event(task_id, 2)]
        await publisher.publish_many(events, handover=(task_id, '{"answer": "a|b"}'))
        await asyncio.wait_for(consumer, 5)
    assert order == [f'{task_id} {{"answer": "a|b"}}', "event 1", "event 2"]
    # Never stored: a replay holds only the events.
    assert [e.data["n"] for e in await listener.replay(task_stream(task_id), None, 10)] == [1, 2]


async def test_keys_written_with_a_publish_are_there_when_its_events_arrive(
    make_bus: BusFactory, bus_kind: str, request: pytest.FixtureRequest
) -> None:
    """A session's hot copy travels with its state event: a subscriber that sees the
    event finds the key set, with its TTL. The in-process bus keeps no keys: it refuses
    them rather than lose them."""
    bus = await make_bus()
    task_id = new_id()
    if bus_kind == "memory":
        with pytest.raises(ValueError, match="keeps no keys"):
            await bus.publish_many([task_event(task_id, 1)], writes=[KeyWrite("k", "v", 60)])
        return
    key = f"{request.getfixturevalue('redis_namespace')}:test:{task_id}"
    seen: list[tuple[int, bytes | None, int]] = []
    async with Redis.from_url(REDIS_URL) as reader:

        async def consume(live: AsyncIterator[Event]) -> None:
            async for event in live:
                seen.append((event.data["n"], await reader.get(key), await reader.ttl(key)))
                return

        async with bus.subscribe(task_stream(task_id), replay=False) as live:
            consumer = asyncio.create_task(consume(live))
            await asyncio.sleep(0)
            write = KeyWrite(key, '{"state": "active"}', 120)
            published = await bus.publish_many([task_event(task_id, 1)], writes=[write])
            await asyncio.wait_for(consumer, 5)
    assert [event.data["n"] for event in published] == [1]
    assert len(seen) == 1
    n, text, ttl = seen[0]
    assert (n, text) == (1, b'{"state": "active"}')
    assert 100 < ttl <= 120


async def test_tenants_have_separate_streams(bus: EventBus) -> None:
    shared_task_id = new_id()
    mine = await bus.publish(task_event(shared_task_id, 1, tenant="tenant-a"))
    theirs = await bus.publish(task_event(shared_task_id, 2, tenant="tenant-b"))

    log_a = await bus.replay(task_stream(shared_task_id, "tenant-a"), None, 100)
    log_b = await bus.replay(task_stream(shared_task_id, "tenant-b"), None, 100)
    assert [event.id for event in log_a] == [mine.id]
    assert [event.id for event in log_b] == [theirs.id]

    # Live delivery is separated the same way.
    ready = asyncio.Event()
    watcher = asyncio.create_task(
        collect(bus, task_stream(shared_task_id, "tenant-b"), 1, replay=False, ready=ready)
    )
    await ready.wait()
    await bus.publish(task_event(shared_task_id, 3, tenant="tenant-a"))
    live_b = await bus.publish(task_event(shared_task_id, 4, tenant="tenant-b"))
    received = await watcher
    assert [event.id for event in received] == [live_b.id]
    assert received[0].tenant_id == "tenant-b"


async def test_stream_cap_trims_the_oldest_events(make_bus: BusFactory, bus_kind: str) -> None:
    cap = 10
    bus = await make_bus(stream_cap=cap)
    task_id = new_id()
    published = [await bus.publish(task_event(task_id, n)) for n in range(250)]

    kept = await bus.replay(task_stream(task_id), None, 1000)

    ids = [event.id for event in published]
    assert cap <= len(kept) < len(published)
    assert [event.id for event in kept] == ids[-len(kept) :]  # the newest, in order
    if bus_kind == "memory":
        assert len(kept) == cap
    else:
        # XADD MAXLEN ~ trims whole stream nodes (stream-node-max-entries, 100 by default).
        assert len(kept) <= cap + 100


# --- subscriptions ----------------------------------------------------------------------
async def test_subscribe_after_a_cursor_gives_missed_then_live_events(bus: EventBus) -> None:
    task_id = new_id()
    stream = task_stream(task_id)
    before = [await bus.publish(task_event(task_id, n)) for n in range(5)]
    cursor = before[1].cursor

    ready = asyncio.Event()
    watcher = asyncio.create_task(collect(bus, stream, 3 + 4, after=cursor, ready=ready))
    await ready.wait()
    live = [await bus.publish(task_event(task_id, n)) for n in range(5, 9)]
    received = await watcher

    assert [event.id for event in received] == [event.id for event in before[2:] + live]


async def test_subscribe_from_the_start_replays_the_whole_log(bus: EventBus) -> None:
    task_id = new_id()
    before = [await bus.publish(task_event(task_id, n)) for n in range(3)]
    ready = asyncio.Event()
    watcher = asyncio.create_task(collect(bus, task_stream(task_id), 4, ready=ready))
    await ready.wait()
    live = await bus.publish(task_event(task_id, 3))
    received = await watcher
    assert [event.id for event in received] == [event.id for event in [*before, live]]


async def test_no_gap_no_duplicate_while_publishing_concurrently(bus: EventBus) -> None:
    """Events published while the subscription starts (its replay racing live delivery)
    arrive exactly once, in order."""
    task_id = new_id()
    stream = task_stream(task_id)
    published = [await bus.publish(task_event(task_id, n)) for n in range(10)]
    cursor = published[4].cursor
    total = 200

    async def publish_rest() -> None:
        for n in range(10, total):
            published.append(await bus.publish(task_event(task_id, n)))
            if n % 7 == 0:
                await asyncio.sleep(0)

    publisher = asyncio.create_task(publish_rest())
    received = await collect(bus, stream, total - 5, after=cursor, timeout=10)
    await publisher

    ids = [event.cursor for event in received]
    assert all(later > earlier for earlier, later in itertools.pairwise(ids))
    assert ids == [event.cursor for event in published if event.cursor > cursor]


async def test_concurrent_subscribers_and_publisher_agree(bus: EventBus) -> None:
    task_id = new_id()
    stream = task_stream(task_id)
    cursor_event = await bus.publish(task_event(task_id, 0))
    published: list[Event] = []

    async def publisher() -> None:
        for n in range(1, 151):
            published.append(await bus.publish(task_event(task_id, n)))
            await asyncio.sleep(0)

    async def late_subscriber(delay: float) -> list[Event]:
        await asyncio.sleep(delay)
        return await collect(bus, stream, 150, after=cursor_event.cursor, timeout=10)

    results = await asyncio.gather(
        publisher(), *(late_subscriber(delay) for delay in (0, 0.001, 0.005, 0.01, 0.02))
    )
    expected = [event.id for event in published]
    for received in results[1:]:
        assert [event.id for event in received] == expected


async def test_subscribe_without_replay_gets_only_new_events(bus: EventBus) -> None:
    task_id = new_id()
    for n in range(3):
        await bus.publish(task_event(task_id, n))
    ready = asyncio.Event()
    watcher = asyncio.create_task(collect(bus, task_stream(task_id), 2, replay=False, ready=ready))
    await ready.wait()
    new = [await bus.publish(task_event(task_id, n)) for n in (3, 4)]
    received = await watcher
    assert [event.id for event in received] == [event.id for event in new]


async def test_a_slow_subscriber_overflows_alone(bus: EventBus) -> None:
    task_id = new_id()
    stream = task_stream(task_id)
    healthy: list[Event] = []
    healthy_ready = asyncio.Event()

    async def keep_up() -> None:
        async with bus.subscribe(stream, replay=False) as events:
            healthy_ready.set()
            async for event in events:
                healthy.append(event)
                if len(healthy) == 20:
                    return

    keeper = asyncio.create_task(keep_up())
    await healthy_ready.wait()
    async with bus.subscribe(stream, replay=False, max_queue=3) as slow:
        assert bus.subscriber_count() == 2
        published = [await bus.publish(task_event(task_id, n)) for n in range(10)]
        await wait_until(lambda: len(healthy) >= 10)  # the live feed has fanned them all out

        got: list[Event] = []

        async def drain() -> None:
            async for event in slow:
                got.append(event)

        with pytest.raises(SubscriberOverflow):
            await asyncio.wait_for(drain(), 5)
        # It got what fit in its queue before being cut off, never more.
        assert [event.id for event in got] == [event.id for event in published[:3]]

        # The others are unaffected and keep receiving.
        more = [await bus.publish(task_event(task_id, n)) for n in range(10, 20)]
        await asyncio.wait_for(keeper, 5)
    assert [event.id for event in healthy] == [event.id for event in published + more]
    assert bus.subscriber_count() == 0


async def test_subscriber_count_returns_to_zero(bus: EventBus) -> None:
    assert bus.subscriber_count() == 0
    task_id = new_id()
    async with (
        bus.subscribe(task_stream(task_id)),
        bus.subscribe(task_stream(task_id), replay=False),
        bus.subscribe(StreamKey("session", TENANT, new_id())),
    ):
        assert bus.subscriber_count() == 3
    assert bus.subscriber_count() == 0

    # A subscription ended by cancellation (a client that went away) is removed too.
    ready = asyncio.Event()
    watcher = asyncio.create_task(collect(bus, task_stream(task_id), 1000, ready=ready))
    await ready.wait()
    assert bus.subscriber_count() == 1
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert bus.subscriber_count() == 0


# --- control messages -------------------------------------------------------------------
async def test_a_finished_subscription_is_freed_without_the_collector(bus: EventBus) -> None:
    """No reference cycle per subscription (each `wait` turn makes one): with the garbage
    collector off, the subscriber is gone as soon as its subscription ends."""
    task_id = new_id()
    gc.collect()
    gc.disable()
    try:
        async with bus.subscribe(task_stream(task_id)) as events:
            [subscriber] = bus._fanout.all_subscribers()  # type: ignore[attr-defined]
            gone = weakref.ref(subscriber)
            del subscriber
            await bus.publish(task_event(task_id, 1))
            assert (await anext(events)).data["n"] == 1
        del events
        for _ in range(6):  # asyncio closes the unfinished iterators in a few turns
            await asyncio.sleep(0)
        assert gone() is None
    finally:
        gc.enable()


async def test_memory_bus_keeps_events_as_text() -> None:
    """What the embedded bus retains for replay is text, which the collector never walks,
    and replay gives back the published events."""
    bus = MemoryEventBus(stream_cap=100, ttl_seconds=3600)
    task_id = new_id()
    published = await bus.publish(task_event(task_id, 7))
    [(_, _, kept)] = bus._streams[task_stream(task_id)]  # type: ignore[attr-defined]
    assert isinstance(kept, str)
    assert not gc.is_tracked(kept)
    assert await bus.replay(task_stream(task_id), None, 10) == [published]


async def test_control_messages_reach_every_process(make_bus: BusFactory, bus_kind: str) -> None:
    here = await make_bus()
    # Redis: a second bus on the same namespace stands for another process.
    there = await make_bus() if bus_kind == "redis" else here
    got_here: list[dict[str, Any]] = []
    got_there: list[dict[str, Any]] = []

    async def on_here(message: dict[str, Any]) -> None:
        got_here.append(message)

    async def on_there(message: dict[str, Any]) -> None:
        got_there.append(message)

    here.on_control(on_here)
    there.on_control(on_there)
    message = {"action": "cancel", "task_id": new_id()}
    await here.publish_control(message)
    # A second message marks the end: control messages arrive in order, so a repeat of
    # the first would come before it.
    marker = {"action": "cancel", "task_id": new_id()}
    await here.publish_control(marker)

    await wait_until(lambda: len(got_here) >= 2 and len(got_there) >= 2)
    assert got_here == [message, marker]
    assert got_there == [message, marker]


# --- Redis only: the live feed survives losing its connection ---------------------------
async def _pubsub_connection_ids(admin: Redis, client_name: str) -> list[str]:
    clients = await admin.client_list()
    return [
        str(entry["id"])
        for entry in clients
        if entry.get("name") == client_name and int(entry.get("sub", 0) or 0) > 0
    ]


async def test_redis_reader_reconnects_and_replays_what_it_missed(redis_namespace: str) -> None:
    client_name = f"aotest-bus-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(REDIS_URL, client_name=client_name)
    bus = RedisEventBus(redis, namespace=redis_namespace, stream_cap=10_000, ttl_seconds=3600)
    await bus.start()
    admin = Redis.from_url(REDIS_URL, decode_responses=True)
    task_id = new_id()
    stream = task_stream(task_id)
    published: list[Event] = []
    received: list[Event] = []
    total = 120

    try:
        ready = asyncio.Event()

        async def follow() -> None:
            async with bus.subscribe(stream, replay=False) as events:
                ready.set()
                async for event in events:
                    received.append(event)
                    if len(received) >= total:
                        return

        follower = asyncio.create_task(follow())
        await ready.wait()

        async def publish(start: int, stop: int) -> None:
            for n in range(start, stop):
                published.append(await bus.publish(task_event(task_id, n)))
                await asyncio.sleep(0.005)

        await publish(0, 20)
        await wait_until(lambda: len(received) >= 20)
        old = await _pubsub_connection_ids(admin, client_name)
        assert len(old) == 1, old

        # Kill the bus's one Pub/Sub connection while events keep coming.
        publisher = asyncio.create_task(publish(20, 80))
        await asyncio.sleep(0.05)
        killed_at = time.monotonic()
        for connection_id in old:
            await admin.execute_command("CLIENT", "KILL", "ID", connection_id)
        await publisher

        deadline = time.monotonic() + 5
        fresh: list[str] = []
        while time.monotonic() < deadline:
            fresh = [
                cid for cid in await _pubsub_connection_ids(admin, client_name) if cid not in old
            ]
            if fresh:
                break
            await asyncio.sleep(0.05)
        assert fresh, "the reader did not reconnect within 5 s"
        assert time.monotonic() - killed_at <= 5

        await publish(80, total)
        done, _ = await asyncio.wait({follower}, timeout=10)
        if not done:
            follower.cancel()
            got = {event.cursor for event in received}
            missing = [event.data["n"] for event in published if event.cursor not in got]
            pytest.fail(f"{len(received)} of {total} events arrived; missing n={missing}")
    finally:
        await bus.close()
        await redis.aclose()
        await admin.aclose()

    ids = [event.cursor for event in received]
    assert ids == [event.cursor for event in published], "a gap or a duplicate after reconnect"
    assert len(set(ids)) == total


async def test_after_a_broken_live_feed_missed_events_come_before_live_ones() -> None:
    """The shared subscription logic, at the exact moment a backend's live feed comes back:
    the backend asks for a replay and, in the same instant, the next live event arrives.
    The missed events must come first; yielding the live one first would skip them."""
    fanout = LocalFanout()
    log: list[Event] = []
    task_id = new_id()
    stream = task_stream(task_id)

    def logged(n: int) -> Event:
        event = task_event(task_id, n).model_copy(update={"id": str(1000 + n)})
        log.append(event)
        return event

    async def replay_fn(key: StreamKey, after: int | None, limit: int) -> list[Event]:
        return [event for event in log if event.cursor > (after or 0)][:limit]

    async with subscription(fanout, replay_fn, stream, None, replay=False, max_queue=10) as sub:
        events = aiter(sub)
        fanout.deliver(logged(1))
        assert (await anext(events)).data == {"n": 1}

        following = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.01)  # the subscriber now waits for a live event
        logged(2), logged(3)  # published while the live feed was down: in the log only
        for subscriber in fanout.all_subscribers():
            subscriber.needs_replay.set()  # the feed is back: read the log
        fanout.deliver(logged(4))  # ... and a live event arrives at once

        got = [(await asyncio.wait_for(following, 1)).data["n"]]
        with contextlib.suppress(TimeoutError):  # fails below, not by hanging
            while len(got) < 3:
                got.append((await asyncio.wait_for(anext(events), 0.5)).data["n"])
        assert got == [2, 3, 4]
        fanout.deliver(logged(5))
        assert (await asyncio.wait_for(anext(events), 1)).data == {"n": 5}


async def test_redis_bus_listens_for_events_only_once_it_has_a_subscriber(
    redis_namespace: str,
) -> None:
    """A process without subscribers (a worker) is not sent the platform's events; the
    first subscriber still gets everything published once its `subscribe` is entered."""
    redis = Redis.from_url(REDIS_URL)
    admin = Redis.from_url(REDIS_URL, decode_responses=True)
    listening = RedisEventBus(redis, namespace=redis_namespace, stream_cap=100, ttl_seconds=60)
    publisher = RedisEventBus(redis, namespace=redis_namespace, stream_cap=100, ttl_seconds=60)
    await listening.start()
    channel = f"{redis_namespace}:events"

    async def listeners() -> int:
        counts = await admin.execute_command("PUBSUB", "NUMSUB", channel)
        return int(counts[1])

    try:
        assert await listeners() == 0
        task_id = new_id()
        async with listening.subscribe(task_stream(task_id), replay=False) as events:
            assert await listeners() == 1
            sent = await publisher.publish(task_event(task_id, 1))
            got = await asyncio.wait_for(anext(aiter(events)), 5)
        assert got.cursor == sent.cursor
    finally:
        await listening.close()
        await redis.aclose()
        await admin.aclose()
