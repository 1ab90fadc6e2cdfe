"""The task runner's hold on its lease, when the database or Redis misbehave: an attempt
whose lease could not be renewed in time stops (the task may be another attempt's by
then); a failing queue heartbeat does not hide what the renewal said; a failed write of
the attempt's end is tried again instead of throwing a finished result away; a stop that
comes after the handler ended does not rewrite its end. With the fakes of
test_runner_cancellation (lease_ttl 0.3 s: a renewal every 0.1 s)."""

from __future__ import annotations

import asyncio
from typing import Any

from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.models.task import TaskStatus
from agent_orchestrator.queue.consumer import ALREADY_FINISHED, TaskContext, _Attempt
from agent_orchestrator.services.task_ledger import Renewal
from tests.test_runner_cancellation import Received, make_runner


async def test_an_attempt_that_cannot_renew_its_lease_in_time_stops() -> None:
    effects: list[str] = []

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        await asyncio.sleep(2)  # far longer than the lease
        effects.append("written")
        return {"ok": True}

    runner, ledger, _bus, task = make_runner(handler)

    async def unreachable(task: TaskRow, worker_id: str) -> Renewal:
        ledger.renewals += 1
        raise ConnectionError("the database is away")

    ledger.renew = unreachable  # type: ignore[method-assign]
    await asyncio.wait_for(runner.run(Received(task)), timeout=1.5)
    assert effects == []  # stopped before its end
    assert ledger.finished == []  # and wrote nothing: the task may be another's now
    assert ledger.renewals >= 1


async def test_a_failing_heartbeat_does_not_hide_a_cancel() -> None:
    async def handler(ctx: TaskContext) -> dict[str, Any]:
        await asyncio.sleep(2)
        return {"ok": True}

    runner, ledger, _bus, task = make_runner(handler)

    async def cancelled(task: TaskRow, worker_id: str) -> Renewal:
        return Renewal.CANCEL

    class BrokenHeartbeat(Received):
        async def heartbeat(self) -> None:
            raise ConnectionError("Redis is away")

    ledger.renew = cancelled  # type: ignore[method-assign]
    await asyncio.wait_for(runner.run(BrokenHeartbeat(task)), timeout=1.5)
    assert ledger.finished == [TaskStatus.CANCELLED]


async def test_a_failed_write_of_the_end_is_tried_again() -> None:
    async def handler(ctx: TaskContext) -> dict[str, Any]:
        return {"ok": True}

    runner, ledger, _bus, task = make_runner(handler)
    record = ledger.finish
    failures = [ConnectionError("connection reset by the database")]

    async def flaky(task: TaskRow, worker_id: str, status: TaskStatus, **kw: Any) -> None:
        if failures:
            raise failures.pop()
        await record(task, worker_id, status, **kw)

    ledger.finish = flaky  # type: ignore[method-assign]
    await asyncio.wait_for(runner.run(Received(task)), timeout=3)
    assert ledger.finished == [TaskStatus.SUCCEEDED]


async def test_a_stop_after_the_handler_ended_changes_nothing() -> None:
    async def done() -> str:
        return "result"

    attempt = _Attempt(asyncio.create_task(done()))
    await attempt.work
    attempt.stop("shutdown")
    assert attempt.reason is None  # its result stands: recorded, not released


async def test_a_handler_that_wrote_its_end_is_not_stopped_by_the_next_renewal() -> None:
    """A chat turn writes its end itself, then publishes its last events: the renewal
    that comes meanwhile finds the task no longer `running`. That is not a lost lease."""
    published: list[str] = []

    async def handler(ctx: TaskContext) -> Any:
        ctx.ended = True  # as ChatTurn does before its end's commit
        await asyncio.sleep(0.35)  # the last publishes, over a renewal or three
        published.append("chat.completed")
        return ALREADY_FINISHED

    runner, ledger, _bus, task = make_runner(handler)

    async def gone(task: TaskRow, worker_id: str) -> Renewal:
        ledger.renewals += 1
        return Renewal.LOST  # what a renewal finds once the end is committed

    ledger.renew = gone  # type: ignore[method-assign]
    await asyncio.wait_for(runner.run(Received(task)), timeout=2)
    assert published == ["chat.completed"]
    assert ledger.renewals == 0
