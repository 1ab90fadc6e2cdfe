"""The end of a chat turn (db/repositories/turn_end.py), on both backends: all or nothing,
nothing when the lease moved on, the reply once, a closed session left as it is."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.db.prepared import Bound
from agent_orchestrator.db.repositories.messages import MESSAGES, MessageRepository
from agent_orchestrator.db.repositories.sessions import SessionRepository
from agent_orchestrator.db.repositories.sessions import transition_call as session_call
from agent_orchestrator.db.repositories.tasks import (
    CALLS,
    Guard,
    TaskRepository,
    transition_call,
)
from agent_orchestrator.db.repositories.turn_end import TurnEnd, end_turn
from agent_orchestrator.db.tables import MessageRow, ServiceCallRow, SessionRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.ids import new_id
from tests.rows import chat_task, session_row

TENANT = "tenant-end"
WORKER = "worker-1"


async def _running_turn(
    factory: async_sessionmaker[AsyncSession], *, session_state: str = "processing"
) -> tuple[TaskRow, SessionRow]:
    now = utcnow()
    closed_at = now if session_state == "closed" else None
    session = session_row(TENANT, state=session_state, closed_at=closed_at)
    task = chat_task(
        session,
        status="running",
        attempt=1,
        progress={"steps_completed": 4, "steps_total": 4},
        lease_owner=WORKER,
        lease_expires_at=now + timedelta(seconds=30),
        started_at=now,
    )
    async with factory() as db:
        await SessionRepository(db).add(session)
        await TaskRepository(db).add(task)
        await db.commit()
    return task, session


def _call(task: TaskRow, step: str, status: str = "succeeded") -> ServiceCallRow:
    now = utcnow()
    return CALLS.new(
        id=new_id(),
        task_id=task.id,
        tenant_id=TENANT,
        step=step,
        service="conversation",
        operation="get_history",
        status=status,
        attempts=1,
        latency_ms=1.5,
        error=None,
        started_at=now,
        finished_at=now,
    )


def _reply(task: TaskRow, message_id: uuid.UUID | None = None) -> MessageRow:
    assert task.session_id is not None
    return MESSAGES.new(
        id=message_id or new_id(),
        session_id=task.session_id,
        tenant_id=TENANT,
        role="assistant",
        content="the answer",
        task_id=task.id,
        metadata_={"model": "echo"},
        created_at=utcnow(),
    )


def _finish(task: TaskRow, owner: str = WORKER) -> Bound:
    now = utcnow()
    values: dict[str, Any] = {
        "status": "succeeded",
        "result": {"content": "the answer"},
        "finished_at": now,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    return transition_call(TENANT, task.id, ["running"], values, Guard(lease_owner=owner))


def _free(session: SessionRow) -> Bound:
    now = utcnow()
    values = {"state": "active", "last_activity_at": now}
    return session_call(TENANT, session.id, ["active", "processing"], now, values)


async def _end(
    factory: async_sessionmaker[AsyncSession],
    task: TaskRow,
    session: SessionRow,
    calls: list[ServiceCallRow],
    reply: MessageRow,
    owner: str = WORKER,
) -> TurnEnd | None:
    async with factory() as db:
        return await end_turn(
            db, task=_finish(task, owner), calls=calls, reply=reply, session=_free(session)
        )


async def _stored(
    factory: async_sessionmaker[AsyncSession], task: TaskRow, session: SessionRow
) -> tuple[TaskRow | None, list[ServiceCallRow], list[MessageRow], SessionRow | None]:
    async with factory() as db:
        return (
            await TaskRepository(db).get(TENANT, task.id),
            await TaskRepository(db).service_calls(TENANT, task.id),
            await MessageRepository(db).latest(TENANT, session.id, 10),
            await SessionRepository(db).get(TENANT, session.id),
        )


async def test_a_turn_ends_with_everything_written_together(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task, session = await _running_turn(factory)
    reply = _reply(task)
    calls = [_call(task, "history"), _call(task, "agent"), _call(task, "generate")]
    ended = await _end(factory, task, session, calls, reply)

    assert ended is not None
    assert ended.task.status == "succeeded"
    assert ended.task.result == {"content": "the answer"}
    assert ended.task.progress == {"steps_completed": 4, "steps_total": 4}
    assert ended.reply is not None
    assert ended.reply.id == reply.id
    assert ended.session is not None
    assert ended.session.state == "active"
    row, stored_calls, messages, stored_session = await _stored(factory, task, session)
    assert row is not None
    assert row.status == "succeeded"
    assert row.lease_owner is None
    assert sorted(call.step for call in stored_calls) == ["agent", "generate", "history"]
    assert [(m.id, m.content, m.metadata_) for m in messages] == [
        (reply.id, "the answer", {"model": "echo"})
    ]
    assert stored_session is not None
    assert stored_session.state == "active"
    assert ended.session.expires_at == stored_session.expires_at


async def test_when_the_lease_moved_on_nothing_is_written(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task, session = await _running_turn(factory)
    ended = await _end(factory, task, session, [_call(task, "history")], _reply(task), "other")

    assert ended is None
    row, calls, messages, stored_session = await _stored(factory, task, session)
    assert row is not None
    assert row.status == "running"
    assert row.lease_owner == WORKER
    assert calls == []
    assert messages == []
    assert stored_session is not None
    assert stored_session.state == "processing"


async def test_a_reply_stored_by_an_earlier_run_is_kept_and_the_task_still_ends(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task, session = await _running_turn(factory)
    earlier = _reply(task)
    async with factory() as db:
        assert await MessageRepository(db).add_once(
            tenant_id=TENANT,
            session_id=session.id,
            message_id=earlier.id,
            role="assistant",
            content="the first answer",
            task_id=task.id,
            metadata={},
        )
        await db.commit()
    # Another id, same task: the one-reply-per-task index refuses it quietly.
    ended = await _end(factory, task, session, [_call(task, "generate")], _reply(task))

    assert ended is not None
    assert ended.reply is None
    assert ended.task.status == "succeeded"
    _, calls, messages, _ = await _stored(factory, task, session)
    assert [m.content for m in messages] == ["the first answer"]
    assert [call.step for call in calls] == ["generate"]


async def test_a_session_closed_meanwhile_stays_closed(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task, session = await _running_turn(factory, session_state="closed")
    ended = await _end(factory, task, session, [_call(task, "history")], _reply(task))

    assert ended is not None
    assert ended.session is None
    assert ended.reply is not None
    _, _, messages, stored_session = await _stored(factory, task, session)
    assert len(messages) == 1
    assert stored_session is not None
    assert stored_session.state == "closed"


async def test_a_step_recorded_before_is_replaced_and_a_repeated_step_counts_once(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task, session = await _running_turn(factory)
    async with factory() as db:
        await TaskRepository(db).replace_service_calls(
            TENANT, task.id, [_call(task, "generate", status="failed")]
        )
        await db.commit()
    calls = [_call(task, "generate", status="failed"), _call(task, "generate")]
    assert await _end(factory, task, session, calls, _reply(task)) is not None

    _, stored_calls, _, _ = await _stored(factory, task, session)
    assert [(call.step, call.status) for call in stored_calls] == [("generate", "succeeded")]
