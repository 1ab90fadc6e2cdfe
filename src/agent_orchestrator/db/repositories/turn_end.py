"""The end of a chat turn: its steps' records, its reply, its task's terminal state and
its session's return, all or nothing, and nothing at all when the task's transition loses
(another worker holds its lease now).

On SQLite that is a transaction of four statements. On PostgreSQL it is one statement,
sent in autocommit: the task's guarded UPDATE is a CTE, and every other write selects
from it, so it writes only when the task's did:

    WITH t AS (UPDATE tasks ... RETURNING tasks.*),
         c AS (INSERT INTO service_calls ... SELECT ... WHERE EXISTS (SELECT FROM t)
               ON CONFLICT (task_id, step) DO UPDATE ...),
         m AS (INSERT INTO messages ... SELECT ... WHERE EXISTS (SELECT FROM t)
               ON CONFLICT DO NOTHING RETURNING id),
         s AS (UPDATE sessions ... AND EXISTS (SELECT FROM t) RETURNING sessions.*)
    SELECT t.*, (SELECT count(*) FROM m) AS reply_stored, s.* FROM t LEFT JOIN s ON true

The four statements and the BEGIN and COMMIT around them were six round trips, each
~160 us of wall time here plus a send and a wake-up in the kernel (docs/architecture.md
has the measurements). The task and session statements are the repositories' own (same
guards, same values), their parameters renamed per part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    Update,
    bindparam,
    exists,
    func,
    literal,
    select,
    true,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import visitors

from agent_orchestrator.db.driver_session import DriverSession
from agent_orchestrator.db.prepared import Bound, hot
from agent_orchestrator.db.repositories.messages import MESSAGES, MessageRepository
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.repositories.sessions import SESSIONS
from agent_orchestrator.db.repositories.tasks import CALLS, TASKS, TaskRepository, upsert_set
from agent_orchestrator.db.tables import MessageRow, ServiceCallRow, SessionRow, TaskRow

#: Parameters of the session's statement are renamed with this prefix; its returned
#: columns are labelled with the other (the task's columns keep their names).
_SESSION_PREFIX = "s_"
_SESSION_COLUMN = "session__"


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
    (task_statement, task_params), (session_statement, session_params) = task, session
    assert isinstance(task_statement, Update)
    assert isinstance(session_statement, Update)
    statement = _statement(task_statement, session_statement, len(calls))
    params = dict(task_params)
    params.update({_SESSION_PREFIX + name: value for name, value in session_params.items()})
    for i, call in enumerate(calls):
        params.update(CALLS.prefixed(call, f"c{i}_"))
    params.update(MESSAGES.prefixed(reply, "m_"))
    result = await db.execute_last(statement, params)
    await db.commit()
    found = result.one_or_none()
    if found is None:
        return None
    moved = None
    if found[_SESSION_COLUMN + "id"] is not None:
        cut = len(_SESSION_COLUMN)
        columns = {k[cut:]: v for k, v in found.items() if k.startswith(_SESSION_COLUMN)}
        moved = SESSIONS.build(columns)
    return TurnEnd(TASKS.build(found), reply if found["reply_stored"] else None, moved)


_statements: dict[tuple[Update, Update, int], Select[Any]] = {}


def _statement(task: Update, session: Update, calls: int) -> Select[Any]:
    key = (task, session, calls)
    found = _statements.get(key)
    if found is None:
        found = _statements[key] = hot(_build(task, session, calls))
    return found


def _build(task: Update, session: Update, calls: int) -> Select[Any]:
    t = task.cte("t")
    task_applied = exists(select(literal(1)).select_from(t))
    m = _guarded_insert(MESSAGES, ["m_"], task_applied)
    m = m.on_conflict_do_nothing().returning(MESSAGES.columns.id).cte("m")
    s = _renamed(session, _SESSION_PREFIX).where(task_applied).cte("s")
    stored = select(func.count()).select_from(m).scalar_subquery().label("reply_stored")
    columns: list[ColumnElement[Any]] = [*t.c, stored]
    columns += [column.label(_SESSION_COLUMN + column.key) for column in s.c]
    statement = select(*columns).select_from(t.outerjoin(s, true())).add_cte(m)
    if calls:
        c = _guarded_insert(CALLS, [f"c{i}_" for i in range(calls)], task_applied)
        index = [CALLS.columns.task_id, CALLS.columns.step]
        statement = statement.add_cte(
            c.on_conflict_do_update(index_elements=index, set_=upsert_set(c)).cte("c")
        )
    return statement


def _guarded_insert(codec: RowCodec[Any], prefixes: list[str], guard: ColumnElement[bool]) -> Any:
    """INSERT INTO table SELECT <one row of parameters per prefix> WHERE guard."""
    rows = [select(*codec.bound_row(prefix).values()).where(guard) for prefix in prefixes]
    source = rows[0] if len(rows) == 1 else union_all(*rows)
    return pg_insert(codec.table).from_select([column.key for column in codec.columns], source)


def _renamed(statement: Update, prefix: str) -> Update:
    """The statement with each of its parameters renamed `prefix + name`: two
    repositories' statements name theirs alike (w_id, v_state ...)."""

    def rename(element: Any, **_: Any) -> Any:
        # Unique parameters (literals, fixed_in's values) carry their value and get a
        # name of their own when compiled: they are left as they are.
        if isinstance(element, BindParameter) and not element.unique:
            return bindparam(
                prefix + element.key,
                element.value,
                type_=element.type,
                required=element.required,
            )
        return None

    renamed = visitors.replacement_traverse(statement, {}, rename)
    assert isinstance(renamed, Update)
    return renamed
