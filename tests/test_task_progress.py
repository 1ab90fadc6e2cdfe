"""A handler's progress: announced with the next event of its task (one publish), or on
its own a moment after the change, and always before the attempt's end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.events.bus import Handover, KeyWrite
from agent_orchestrator.events.memory import MemoryEventBus
from agent_orchestrator.events.models import Event, StreamKey
from agent_orchestrator.queue.consumer import PROGRESS_DELAY, TaskContext


class CountingBus(MemoryEventBus):
    """The in-process bus, noting what each publish carried (a Redis round trip each)."""

    def __init__(self) -> None:
        super().__init__(stream_cap=100, ttl_seconds=60)
        self.publishes: list[list[str]] = []

    async def publish_many(
        self,
        events: Sequence[Event],
        handover: Handover | None = None,
        writes: Sequence[KeyWrite] = (),
    ) -> list[Event]:
        self.publishes.append([_label(event) for event in events])
        return await super().publish_many(events, handover, writes)


def _label(event: Event) -> str:
    if event.type == "task.status":
        return f"progress {event.data['progress']['steps_completed']}"
    return event.type


def _context() -> tuple[TaskContext, CountingBus]:
    task = TaskRow(
        id=uuid.uuid4(),
        tenant_id="tenant-a",
        session_id=None,
        kind="test.kind",
        status="running",
        attempt=1,
        max_attempts=1,
        progress={},
        input={},
    )
    bus = CountingBus()
    none: Any = None  # the ledger and the database are not used for events
    return TaskContext(task, "worker-1", none, bus, none), bus


async def _logged(bus: CountingBus, context: TaskContext) -> list[str]:
    stream = StreamKey("task", "tenant-a", str(context.task.id))
    return [_label(event) for event in await bus.replay(stream, None, 100)]


async def test_progress_travels_with_the_next_event() -> None:
    context, bus = _context()
    await context.progress(1, 3)
    await context.progress(2, 3)  # a step finishing right after: the same state, updated
    await context.emit("chat.stream", {"chunk": "a"})

    assert bus.publishes == [["progress 2", "chat.stream"]]
    assert await _logged(bus, context) == ["progress 2", "chat.stream"]


async def test_progress_goes_out_alone_when_no_event_follows_soon() -> None:
    context, bus = _context()
    await context.progress(1, 3)
    await asyncio.sleep(PROGRESS_DELAY * 5)
    await context.emit("chat.stream", {"chunk": "a"})

    assert bus.publishes == [["progress 1"], ["chat.stream"]]


async def test_the_last_progress_is_out_before_the_attempt_ends() -> None:
    context, bus = _context()
    await context.progress(3, 3)
    await context.settle()  # what the runner does before recording the end
    await context.settle()  # nothing left: no publish

    assert bus.publishes == [["progress 3"]]
    await asyncio.sleep(PROGRESS_DELAY * 3)  # the timer was cancelled: no second event
    assert await _logged(bus, context) == ["progress 3"]


async def test_events_published_together_follow_the_waiting_progress() -> None:
    context, bus = _context()
    await context.progress(4, 4)
    done = [context.event("chat.completed", {}), context.event("session.state", {})]
    published = await context.publish(done)

    assert [event.type for event in published] == ["chat.completed", "session.state"]
    assert bus.publishes == [["progress 4", "chat.completed", "session.state"]]
