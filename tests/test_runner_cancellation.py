"""The task runner when a cancellation is swallowed.

redis-py (8.x, asyncio) swallows a CancelledError that lands while a command is in flight
(about a third of such cancels on this machine), so code that awaits Redis cannot be
stopped by one `Task.cancel()`. Two failures of the fault drills came from this:
- the lease keeper, cancelled inside its SAQ heartbeat, renewed the lease forever and its
  attempt never recorded an end: a task stayed `running` with a live lease (SIGTERM drill);
- a handler cancelled inside a Redis publish ran on to its end, side effects included,
  although the task was recorded `cancelled` (or `timed_out`).
These tests pin both with fakes that swallow a cancel the way redis-py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from agent_orchestrator.db.tables import SessionRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.models.task import TaskStatus
from agent_orchestrator.queue.base import Delivery
from agent_orchestrator.queue.consumer import TaskContext, TaskRunner
from agent_orchestrator.queue.registry import HandlerRegistry, SessionOnClaim, TaskFailure
from agent_orchestrator.services.task_ledger import Claim, Renewal


@dataclass
class RunningEvent:
    """The `running` event, as FakeBus publishes it: slowly, or not at all."""

    seconds: float
    fails: bool


class FakeLedger:
    def __init__(
        self, task: TaskRow, *, announce_seconds: float = 0.0, announce_fails: bool = False
    ) -> None:
        self.task = task
        self.finished: list[TaskStatus] = []
        self.renewals = 0
        self.announce_seconds = announce_seconds
        self.announce_fails = announce_fails
        #: the session row the claim moved, if any (see TaskLedger.claim)
        self.session: SessionRow | None = None

    async def claim(self, tenant_id: str, task_id: uuid.UUID, worker_id: str, *_: Any) -> Claim:
        return Claim(self.task, self.session, utcnow())

    def announcement(self, task: TaskRow) -> RunningEvent:
        return RunningEvent(self.announce_seconds, self.announce_fails)

    async def renew(self, task: TaskRow, worker_id: str) -> Renewal:
        self.renewals += 1
        return Renewal.ALIVE

    async def finish(self, task: TaskRow, worker_id: str, status: TaskStatus, **_: Any) -> None:
        self.finished.append(status)


class FakeBus:
    def __init__(self) -> None:
        self.control: list[Any] = []
        self.published: list[list[Any]] = []  # what each publish carried
        self.written: list[list[Any]] = []  # the keys each publish set

    def on_control(self, handler: Any) -> None:
        self.control.append(handler)

    async def send(self, message: dict[str, Any]) -> None:
        for handler in self.control:
            await handler(message)

    async def publish(self, event: Any) -> Any:
        return event

    async def publish_many(
        self, events: list[Any], handover: Any = None, writes: Any = ()
    ) -> list[Any]:
        running = next((e for e in events if isinstance(e, RunningEvent)), None)
        if running is not None:
            await asyncio.sleep(running.seconds)  # the `running` event on its way
            if running.fails:
                raise ConnectionError("Redis went away")
        self.published.append(list(events))
        self.written.append(list(writes))
        return events


class Received:
    def __init__(self, task: TaskRow, *, swallow_in_heartbeat: bool = False) -> None:
        self.delivery = Delivery(str(task.id), task.tenant_id, "interactive", 1, task.kind)
        self.swallow = swallow_in_heartbeat
        self.in_heartbeat = asyncio.Event()

    async def heartbeat(self) -> None:
        self.in_heartbeat.set()
        if not self.swallow:
            return
        with contextlib.suppress(asyncio.CancelledError):  # what redis-py does with it
            await asyncio.sleep(0.3)  # a Redis command in flight

    async def done(self) -> None:
        return None


def make_runner(
    handler: Any,
    *,
    task_timeout: float = 30.0,
    announce_seconds: float = 0.0,
    on_claimed: SessionOnClaim | None = None,
) -> tuple[TaskRunner, FakeLedger, FakeBus, TaskRow]:
    task = TaskRow(
        id=uuid.uuid4(),
        tenant_id="tenant-a",
        session_id=None,
        kind="test.kind",
        attempt=1,
        max_attempts=1,
        progress={},
        input={},
    )
    ledger, bus = FakeLedger(task, announce_seconds=announce_seconds), FakeBus()
    registry = HandlerRegistry()
    registry.register("test.kind", handler, on_claimed=on_claimed)
    runner = TaskRunner(
        ledger=ledger,  # type: ignore[arg-type]
        registry=registry,
        bus=bus,  # type: ignore[arg-type]
        db_factory=None,  # type: ignore[arg-type]
        worker_id="worker-1",
        task_timeout=task_timeout,
        lease_ttl=0.3,  # renew every 0.1 s
        backoff_initial=0.1,
        backoff_max=1.0,
    )
    return runner, ledger, bus, task


async def test_an_attempt_ends_when_the_lease_keeper_swallows_its_cancel() -> None:
    received: Received | None = None

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        assert received is not None
        await received.in_heartbeat.wait()  # finish while the keeper is inside Redis
        return {"ok": True}

    runner, ledger, _bus, task = make_runner(handler)
    received = Received(task, swallow_in_heartbeat=True)
    await asyncio.wait_for(runner.run(received), timeout=3)
    assert ledger.finished == [TaskStatus.SUCCEEDED]
    renewals = ledger.renewals
    await asyncio.sleep(0.3)
    assert ledger.renewals == renewals, "the lease keeper is still renewing"


@pytest.mark.parametrize("stop", ["cancel", "timeout"])
async def test_a_handler_that_swallows_a_cancel_is_still_stopped(stop: str) -> None:
    started = asyncio.Event()
    effects: list[str] = []

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as redis-py may
            await asyncio.sleep(5)  # a Redis publish in flight
        await asyncio.sleep(5)  # the rest of the work
        effects.append("written")
        return {"ok": True}

    runner, ledger, bus, task = make_runner(handler, task_timeout=0.2 if stop == "timeout" else 30)
    running = asyncio.create_task(runner.run(Received(task)))
    await started.wait()
    if stop == "cancel":
        await bus.send({"action": "cancel", "task_id": str(task.id)})
    await asyncio.wait_for(running, timeout=2)
    expected = TaskStatus.CANCELLED if stop == "cancel" else TaskStatus.TIMED_OUT
    assert ledger.finished == [expected]
    assert effects == []


async def test_a_step_cancelled_while_waiting_for_the_running_event_does_not_lose_the_attempt() -> (
    None
):
    """A plan cancels its other steps when a required one fails; a step then waiting for
    the `running` event (to emit after it) must not cancel that event's publication, or
    the runner, which awaits it before recording, would never record the failure."""
    waiting = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        async def sibling_step() -> None:
            waiting.set()
            await ctx.emit("test.progress", {})

        step = asyncio.create_task(sibling_step())
        await waiting.wait()
        await asyncio.sleep(0.05)  # the step is inside emit, the event still on its way
        step.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await step
        raise TaskFailure("downstream_error", "the required step failed")

    runner, ledger, _bus, task = make_runner(handler, announce_seconds=0.3)
    await asyncio.wait_for(runner.run(Received(task)), timeout=3)
    assert ledger.finished == [TaskStatus.FAILED]


async def test_an_attempt_is_recorded_when_its_running_event_could_not_be_published() -> None:
    async def handler(ctx: TaskContext) -> dict[str, Any]:
        await ctx.emit("test.progress", {})  # waits for the announcement, which failed
        return {"ok": True}

    runner, ledger, _bus, task = make_runner(handler)
    ledger.announce_fails = True
    await asyncio.wait_for(runner.run(Received(task)), timeout=3)
    assert ledger.finished == [TaskStatus.SUCCEEDED]


async def test_the_claim_follow_up_is_published_with_running_and_cannot_stop_it() -> None:
    """The events and key writes that follow a claim which moved the session go out in the
    `running` event's publish; a follow-up that fails (the session unreadable, say)
    leaves `running` to go out alone."""

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        return {"ok": True}

    async def session_processing() -> tuple[list[str], list[str]]:
        return ["session processing"], ["hot copy"]

    async def unreachable() -> tuple[list[str], list[str]]:
        raise ConnectionError("session unreadable")

    for follow_up, expected in [(session_processing, 2), (unreachable, 1)]:
        on_claimed = SessionOnClaim(
            move=lambda *_: pytest.fail("the fake ledger makes no statement"),
            moved=lambda task, row, at, follow_up=follow_up: follow_up,
        )
        runner, ledger, bus, task = make_runner(handler, on_claimed=on_claimed)
        ledger.session = SessionRow(id=uuid.uuid4(), tenant_id=task.tenant_id)
        await asyncio.wait_for(runner.run(Received(task)), timeout=3)
        first = bus.published[0]
        assert isinstance(first[0], RunningEvent)
        assert len(first) == expected
        assert first[1:] == ["session processing"][: expected - 1]
        assert bus.written[0] == ["hot copy"][: expected - 1]
        assert ledger.finished == [TaskStatus.SUCCEEDED]
