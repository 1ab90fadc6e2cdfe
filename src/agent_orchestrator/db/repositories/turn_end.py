"""The end of a chat turn: its steps' records, its reply, its task's terminal state and
its session's return, all or nothing, and nothing at all when the task's transition loses
(another worker holds its lease now).

On SQLite that is a transaction of four statements. On PostgreSQL it is one statement,
sent in autocommit: the task's and the session's transitions as task_session.py joins
them, with the steps' records and the reply written by two more CTEs that select from
the task's, so they write only when it did:

    WITH t AS (UPDATE tasks ... RETURNING tasks.*),
         c AS (INSERT INTO service_calls ... SELECT ... WHERE EXISTS (SELECT FROM t)
               ON CONFLICT (task_id, step) DO UPDATE ...),
         m AS (INSERT INTO messages ... SELECT ... WHERE EXISTS (SELECT FROM t)
               ON CONFLICT DO NOTHING RETURNING id),
         s AS (UPDATE sessions ... RETURNING sessions.*)
    SELECT t.*, (SELECT count(*) FROM m) AS reply_stored, s.* FROM t LEFT JOIN s ON true

The four statements and the BEGIN and COMMIT around them were six round trips, each
~160 us of wall time here plus a send and a wake-up in the kernel (docs/architecture.md
has the measurements).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, Update, func, select, union_all
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.driver_session import DriverSession
from agent_orchestrator.db.prepared import Bound, hot
from agent_orchestrator.db.repositories.messages import MESSAGES, MessageRepository
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.repositories.sessions import SESSIONS
from agent_orchestrator.db.repositories.task_session import (
    joint_params,
    joint_rows,
    joint_statement,
)
from agent_orchestrator.db.repositories.tasks import CALLS, TASKS, TaskRepository, upsert_set
from agent_orchestrator.db.tables import MessageRow, ServiceCallRow, SessionRow, TaskRow


@dataclass(frozen=True)
class TurnEnd:
    task: TaskRow
    #: the reply as stored by this call; None when it was there already (an earlier run)
    reply: MessageRow | None
    #: None when the session was closed or expired meanwhile (it stays as it is)
    session: SessionRow | None


async def end_turn(
    db: AsyncSession,
    *,
    task: Bound,
    calls: list[ServiceCallRow],
    reply: MessageRow,
    session: Bound,
) -> TurnEnd | None:
    """Write and commit the turn's end; None, with nothing written, when the task's
    transition `task` (an UPDATE ... RETURNING of TaskRepository) did not apply.
    `session` is the session's transition (SessionRepository)."""
    assert reply.task_id is not None, "a turn's reply belongs to its task"
    calls = list({call.step: call for call in calls}.values())  # a step's latest record
    if isinstance(db, DriverSession):
        return await _in_one_statement(db, task, calls, reply, session)
    await TaskRepository(db).replace_service_calls(reply.tenant_id, reply.task_id, calls)
    stored = await MessageRepository(db).add_once(**_reply_fields(reply))
    row = await TASKS.one(db, *task)
    if row is None:
        await db.rollback()
        return None
    moved = await SESSIONS.one(db, *session)
    await db.commit()
    return TurnEnd(row, stored, moved)


def _reply_fields(reply: MessageRow) -> dict[str, Any]:
    return {
        "tenant_id": reply.tenant_id,
        "session_id": reply.session_id,
        "message_id": reply.id,
        "role": reply.role,
        "content": reply.content,
        "task_id": reply.task_id,
        "metadata": reply.metadata_,
    }


async def _in_one_statement(
    db: DriverSession, task: Bound, calls: list[ServiceCallRow], reply: MessageRow, session: Bound
) -> TurnEnd | None:
    task_statement, session_statement = task[0], session[0]
    assert isinstance(task_statement, Update)
    assert isinstance(session_statement, Update)
    statement = _statement(task_statement, session_statement, len(calls))
    params = joint_params(task, session)
    for i, call in enumerate(calls):
        params.update(CALLS.prefixed(call, f"c{i}_"))
    params.update(MESSAGES.prefixed(reply, "m_"))
    result = await db.execute_last(statement, params)
    await db.commit()
    found = result.one_or_none()
    if found is None:
        return None
    row, moved = joint_rows(found)
    return TurnEnd(row, reply if found["reply_stored"] else None, moved)


@functools.cache
def _statement(task: Update, session: Update, calls: int) -> Select[Any]:
    # Keyed by the two statements, which their repositories build once per shape.
    statement, task_applied = joint_statement(task, session)
    m = _guarded_insert(MESSAGES, ["m_"], task_applied)
    m = m.on_conflict_do_nothing().returning(MESSAGES.columns.id).cte("m")
    stored = select(func.count()).select_from(m).scalar_subquery().label("reply_stored")
    statement = statement.add_columns(stored).add_cte(m)
    if calls:
        c = _guarded_insert(CALLS, [f"c{i}_" for i in range(calls)], task_applied)
        index = [CALLS.columns.task_id, CALLS.columns.step]
        statement = statement.add_cte(
            c.on_conflict_do_update(index_elements=index, set_=upsert_set(c)).cte("c")
        )
    return hot(statement)


def _guarded_insert(codec: RowCodec[Any], prefixes: list[str], guard: ColumnElement[bool]) -> Any:
    """INSERT INTO table SELECT <one row of parameters per prefix> WHERE guard."""
    rows = [select(*codec.bound_row(prefix).values()).where(guard) for prefix in prefixes]
    source = rows[0] if len(rows) == 1 else union_all(*rows)
    return pg_insert(codec.table).from_select([column.key for column in codec.columns], source)
