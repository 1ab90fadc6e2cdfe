"""One conformance suite for every TaskQueue: the in-process queue of embedded mode and SAQ
on real Redis (a fresh namespace per test). Then the worker pool on top of the queue:
interactive work never waits behind bulk work."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.models.principal import USER_SCOPES, Principal
from agent_orchestrator.models.task import TaskStatus
from agent_orchestrator.queue.base import Delivery, TaskQueue
from agent_orchestrator.queue.memory import MemoryTaskQueue
from agent_orchestrator.queue.saq_backend import SaqTaskQueue
from agent_orchestrator.services.task_ledger import Submission
from tests.conftest import REDIS_URL, running_app

INTERACTIVE = "interactive"
BULK = "bulk"
NAMES = [INTERACTIVE, BULK]


@dataclass
class QueueUnderTest:
    queue: TaskQueue
    #: Make the backend forget everything it holds; returns the queue to use afterwards.
    lose_data: Callable[[], Awaitable[TaskQueue]]


@pytest.fixture(params=["memory", "saq"])
def queue_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def namespace(queue_kind: str, request: pytest.FixtureRequest) -> str:
    # The conftest fixture cleans the namespace's keys afterwards.
    return request.getfixturevalue("redis_namespace") if queue_kind == "saq" else "memory"


@pytest.fixture
async def subject(queue_kind: str, namespace: str) -> AsyncIterator[QueueUnderTest]:
    if queue_kind == "memory":
        state = {"queue": MemoryTaskQueue(NAMES)}

        async def lose_memory() -> TaskQueue:
            # An in-process queue "loses its data" when its process restarts.
            await state["queue"].close()
            state["queue"] = MemoryTaskQueue(NAMES)
            return state["queue"]

        yield QueueUnderTest(state["queue"], lose_memory)
        await state["queue"].close()
        return

    redis = Redis.from_url(REDIS_URL)
    queue = SaqTaskQueue(redis, namespace=namespace, queue_names=NAMES, job_timeout=30, heartbeat=5)
    await queue.start()

    async def lose_redis() -> TaskQueue:
        # Everything SAQ keeps for this namespace: lists and sets, jobs, abort markers.
        keys = [
            key
            for pattern in (
                f"saq:{namespace}:*",
                f"saq:job:{namespace}:*",
                f"saq:abort:{namespace}:*",
            )
            async for key in redis.scan_iter(match=pattern, count=1000)
        ]
        assert keys, "the queue wrote nothing under its namespace"
        await redis.delete(*keys)
        return queue

    try:
        yield QueueUnderTest(queue, lose_redis)
    finally:
        await queue.close()
        await redis.aclose()


def delivery(queue: str = INTERACTIVE, number: int = 1) -> Delivery:
    return Delivery(
        task_id=str(uuid.uuid4()),
        tenant_id="tenant-a",
        queue=queue,
        number=number,
        kind="chat",
        session_id=str(uuid.uuid4()),
    )


async def test_enqueue_then_receive_gives_the_same_delivery(subject: QueueUnderTest) -> None:
    queue = subject.queue
    sent = delivery()
    assert await queue.enqueue(sent) is True

    received = await queue.receive(INTERACTIVE, wait_seconds=1.0)

    assert received is not None
    assert received.delivery == sent
    await received.heartbeat()  # a live delivery can be touched while it runs
    await received.done()
    assert await queue.receive(INTERACTIVE, wait_seconds=0.1) is None


def test_a_delivery_reads_back_from_older_and_newer_payloads() -> None:
    """What a queue carries is `as_kwargs`: one queued by an earlier version lacks kind and
    session; one from a later version may name more, which is ignored."""
    sent = delivery()
    older = {k: v for k, v in sent.as_kwargs().items() if k not in ("kind", "session_id")}
    assert Delivery.from_kwargs(sent.as_kwargs()) == sent
    assert Delivery.from_kwargs({**sent.as_kwargs(), "priority": 3}) == sent
    assert Delivery.from_kwargs(older) == Delivery(**older)
    assert (Delivery(**older).kind, Delivery(**older).session_id) == (None, None)


async def test_saq_marks_a_received_job_active_and_finishes_it_without_notifications(
    redis_namespace: str,
) -> None:
    """SAQ's bookkeeping of a job as its sweeper reads it: `active` while it runs (the mark
    is written while the task is claimed, and always before the job's end), `complete`
    with an expiry after `done`, and out of the active list; nothing is published on the
    job's own channel, which nobody here listens to."""
    redis = Redis.from_url(REDIS_URL)
    queue = SaqTaskQueue(
        redis, namespace=redis_namespace, queue_names=NAMES, job_timeout=30, heartbeat=5
    )
    await queue.start()
    pubsub = redis.pubsub()
    try:
        sent = delivery()
        await queue.enqueue(sent)
        job_id = f"saq:job:{redis_namespace}:{INTERACTIVE}:{sent.key}"
        await pubsub.psubscribe(f"saq:job:{redis_namespace}:*")
        received = await queue.receive(INTERACTIVE, wait_seconds=1.0)
        assert received is not None
        await received.heartbeat()
        stored = json.loads(await redis.get(job_id))
        assert (stored["status"], stored["attempts"]) == ("active", 1)
        active = f"saq:{redis_namespace}:{INTERACTIVE}:active"
        assert await redis.lrange(active, 0, -1) == [job_id.encode()]

        await received.done()
        stored = json.loads(await redis.get(job_id))
        assert stored["status"] == "complete"
        assert 0 < await redis.ttl(job_id) <= 600
        assert await redis.lrange(active, 0, -1) == []
        assert await queue.is_pending(sent) is False
        messages = []
        while (message := await pubsub.get_message(timeout=0.2)) is not None:
            messages.append(message)
        assert [m["type"] for m in messages] == ["psubscribe"]
    finally:
        await pubsub.aclose()
        await queue.close()
        await redis.aclose()


async def test_saq_a_late_active_mark_does_not_bring_back_a_forgotten_job(
    redis_namespace: str,
) -> None:
    """The mark is written while the runner claims (not awaited by `receive`), so it may
    land after Redis forgot the job (a flush): the job must stay gone, or the reconciler
    would see it pending forever. Raced twenty times: without the guard most rounds leave
    the job behind."""
    redis = Redis.from_url(REDIS_URL)
    queue = SaqTaskQueue(
        redis, namespace=redis_namespace, queue_names=NAMES, job_timeout=30, heartbeat=5
    )
    await queue.start()
    try:
        for _ in range(20):
            sent = delivery()
            await queue.enqueue(sent)
            received = await queue.receive(INTERACTIVE, wait_seconds=1.0)
            assert received is not None
            await redis.delete(f"saq:job:{redis_namespace}:{INTERACTIVE}:{sent.key}")
            await cast(Any, received).marking  # the mark's round trip, done
            assert await queue.is_pending(sent) is False
    finally:
        await queue.close()
        await redis.aclose()


async def test_a_key_still_held_is_refused_and_received_once(subject: QueueUnderTest) -> None:
    queue = subject.queue
    sent = delivery()
    assert await queue.enqueue(sent) is True
    assert await queue.enqueue(sent) is False
    assert await queue.enqueue(Delivery(**sent.as_kwargs())) is False  # equal, not identical

    first = await queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert first is not None
    assert first.delivery == sent
    # Still held while received-but-not-done: a redelivery of the same key is refused too.
    assert await queue.enqueue(sent) is False
    assert await queue.receive(INTERACTIVE, wait_seconds=0.2) is None

    # The next delivery number of the same task is a different key.
    second = Delivery(**{**sent.as_kwargs(), "number": 2})
    assert await queue.enqueue(second) is True
    again = await queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert again is not None
    assert again.delivery == second


async def test_is_pending_until_done(subject: QueueUnderTest) -> None:
    queue = subject.queue
    sent, never_sent = delivery(), delivery()
    assert await queue.is_pending(sent) is False
    await queue.enqueue(sent)

    assert await queue.is_pending(sent) is True  # queued
    received = await queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert received is not None
    assert await queue.is_pending(sent) is True  # received, still running
    await received.done()

    assert await queue.is_pending(sent) is False
    assert await queue.is_pending(never_sent) is False


async def test_delayed_delivery_waits_until_due(subject: QueueUnderTest) -> None:
    queue = subject.queue
    sent = delivery()
    started = time.monotonic()
    assert await queue.enqueue(sent, delay=2.0) is True
    assert await queue.is_pending(sent) is True

    # Asking early, even with promotion, gets nothing (Redis times blocking calls out at
    # its own ~0.1 s resolution, so each empty receive may last that long).
    while time.monotonic() - started < 1.0:
        await queue.promote_due()
        assert await queue.receive(INTERACTIVE, wait_seconds=0.05) is None
    assert time.monotonic() - started < 1.8, "the early checks took too long to mean anything"
    assert await queue.depth(INTERACTIVE) == 0

    await asyncio.sleep(max(0.0, 2.1 - (time.monotonic() - started)))
    await queue.promote_due()
    received = await queue.receive(INTERACTIVE, wait_seconds=0.5)

    assert received is not None, "a due delivery was not receivable after promote_due()"
    assert received.delivery == sent
    assert time.monotonic() - started >= 1.95


async def test_queues_do_not_mix(subject: QueueUnderTest) -> None:
    queue = subject.queue
    bulk = [delivery(BULK) for _ in range(50)]
    for item in bulk:
        assert await queue.enqueue(item)
    urgent = delivery(INTERACTIVE)
    await queue.enqueue(urgent)

    started = time.monotonic()
    received = await queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert received is not None
    assert received.delivery == urgent
    assert time.monotonic() - started < 0.5
    assert await queue.receive(INTERACTIVE, wait_seconds=0.05) is None

    assert await queue.depth(BULK) == 50
    assert await queue.depth(INTERACTIVE) == 0
    first_bulk = await queue.receive(BULK, wait_seconds=1.0)
    assert first_bulk is not None
    assert first_bulk.delivery.queue == BULK
    assert first_bulk.delivery in bulk


async def test_depth_counts_queued_deliveries(subject: QueueUnderTest) -> None:
    queue = subject.queue
    assert await queue.depth(INTERACTIVE) == 0
    for _ in range(3):
        await queue.enqueue(delivery())
    assert await queue.depth(INTERACTIVE) == 3
    assert await queue.depth(BULK) == 0

    received = await queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert received is not None
    assert await queue.depth(INTERACTIVE) == 2
    await received.done()
    assert await queue.depth(INTERACTIVE) == 2


async def test_after_data_loss_nothing_is_pending(subject: QueueUnderTest) -> None:
    queued, running = delivery(), delivery()
    await subject.queue.enqueue(running)
    received = await subject.queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert received is not None
    await subject.queue.enqueue(queued)
    assert await subject.queue.is_pending(queued)
    assert await subject.queue.is_pending(running)

    queue = await subject.lose_data()

    # The reconciler relies on this answer to re-deliver what the queue forgot.
    assert await queue.is_pending(queued) is False
    assert await queue.is_pending(running) is False
    assert await queue.depth(INTERACTIVE) == 0
    # ... and the forgotten key can be delivered again.
    assert await queue.enqueue(queued) is True
    again = await queue.receive(INTERACTIVE, wait_seconds=1.0)
    assert again is not None
    assert again.delivery == queued


# --- the worker pool: interactive work never waits behind bulk work ---------------------
async def _wait_for_status(
    state: object, principal: Principal, task_id: uuid.UUID, wanted: set[str], timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        async with UnitOfWork(state.db_factory) as uow:  # type: ignore[attr-defined]
            view = await state.ledger.view(uow, principal, task_id)  # type: ignore[attr-defined]
        status = view.status.value
        if status in wanted:
            return status
        await asyncio.sleep(0.02)
    return status


async def test_interactive_task_starts_while_bulk_slots_are_busy(
    make_backend_settings: Callable[..., Settings],
) -> None:
    settings = make_backend_settings(
        task_handler_modules=["tests.engine_handlers"], bulk_concurrency=1
    )
    principal = Principal("tenant-a", "user-1", frozenset(USER_SCOPES))
    async with running_app(settings) as client:
        state = client.app.state.core  # type: ignore[attr-defined]

        async def submit(kind: str, queue: str, seconds: float) -> uuid.UUID:
            async with UnitOfWork(state.db_factory) as uow:
                row, created = await state.ledger.submit(
                    uow, principal, Submission(kind=kind, queue=queue, input={"seconds": seconds})
                )
            assert created
            return row.id

        long_bulk = await submit("test.bulk_sleep", BULK, 20.0)
        assert await _wait_for_status(state, principal, long_bulk, {"running"}, 5.0) == "running"
        waiting_bulk = await submit("test.bulk_sleep", BULK, 0.01)

        started = time.monotonic()
        interactive = await submit("test.sleep", INTERACTIVE, 0.01)
        status = await _wait_for_status(state, principal, interactive, {"succeeded"}, 3.0)
        elapsed = time.monotonic() - started

        assert status == "succeeded"
        assert elapsed < 1.5, f"interactive task waited {elapsed:.2f}s behind bulk work"
        # The bulk slot really was full: the second bulk task is still waiting for it.
        async with UnitOfWork(state.db_factory) as uow:
            assert (await state.ledger.view(uow, principal, long_bulk)).status == "running"
            waiting = await state.ledger.view(uow, principal, waiting_bulk)
        assert waiting.status == TaskStatus.QUEUED
        assert waiting.attempt == 0

        for task_id in (long_bulk, waiting_bulk):
            async with UnitOfWork(state.db_factory) as uow:
                await state.ledger.request_cancel(uow, principal, task_id)
        assert await _wait_for_status(state, principal, long_bulk, {"cancelled"}, 3.0) == (
            "cancelled"
        )
