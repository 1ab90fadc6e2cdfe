"""Every query on messages. Each method takes the tenant and filters by it. The statements
each chat turn runs are built once (see `rows.py`)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Insert, Select, bindparam, case, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.prepared import hot
from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.repositories.tasks import TASKS
from agent_orchestrator.db.tables import MessageRow
from agent_orchestrator.db.types import utcnow

MESSAGES = RowCodec(MessageRow)
_M = MESSAGES.columns


def _latest(*, excluding_task: bool) -> Select[Any]:
    tenant = bindparam("tenant_id", type_=_M.tenant_id.type)
    session = bindparam("session_id", type_=_M.session_id.type)
    query = select(MESSAGES.table).where(_M.tenant_id == tenant, _M.session_id == session)
    if excluding_task:
        tasks, answered = TASKS.columns, bindparam("task_id", type_=_M.task_id.type)
        answering = select(tasks.created_at).where(tasks.tenant_id == tenant, tasks.id == answered)
        later = select(tasks.id).where(
            tasks.tenant_id == tenant,
            tasks.session_id == session,
            tasks.created_at >= answering.scalar_subquery(),
        )
        query = query.where(
            _M.task_id.is_(None) | ((_M.task_id != answered) & _M.task_id.not_in(later))
        )
    # In the order of the conversation, not of storage: a turn's user message is stored
    # when it is sent, its reply when the turn ends, so two turns sent back to back were
    # stored u1, u2, a1, a2. Task ids are time-ordered (ids.new_id): turn by turn, the
    # user's message before the reply. Messages of no turn (saved through the
    # conversation contract without a task) keep their own order, before the turns'.
    replies_last = case((_M.task_id.is_(None), 0), (_M.role == "user", 0), else_=1)
    newest_first = (
        _M.task_id.desc().nulls_last(),
        replies_last.desc(),
        _M.created_at.desc(),
        _M.id.desc(),
    )
    return hot(query.order_by(*newest_first).limit(bindparam("limit")))


_LATEST = _latest(excluding_task=False)
_LATEST_BEFORE_TASK = _latest(excluding_task=True)
_BY_ID = hot(
    select(MESSAGES.table).where(
        _M.tenant_id == bindparam("tenant_id"), _M.id == bindparam("message_id")
    )
)
#: INSERT ... ON CONFLICT DO NOTHING, per dialect.
_ADD_ONCE: dict[str, Insert] = {
    "postgresql": hot(pg_insert(MESSAGES.table).on_conflict_do_nothing()),
    "sqlite": hot(sqlite_insert(MESSAGES.table).on_conflict_do_nothing()),
}


class MessageRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, row: MessageRow) -> MessageRow:
        await MESSAGES.add(self.db, row)
        return row

    async def list_for_session(
        self, tenant_id: str, session_id: uuid.UUID, *, limit: int, cursor: str | None
    ) -> tuple[list[MessageRow], str | None]:
        """Oldest first: a conversation reads top to bottom."""
        query = select(MessageRow).where(
            MessageRow.tenant_id == tenant_id, MessageRow.session_id == session_id
        )
        query = keyset_page(
            query,
            MessageRow.created_at,
            MessageRow.id,
            limit=limit,
            cursor=cursor,
            newest_first=False,
        )
        rows = list((await self.db.execute(query)).scalars())
        return split_page(rows, limit, lambda row: (row.created_at, row.id))

    async def latest(
        self,
        tenant_id: str,
        session_id: uuid.UUID,
        limit: int,
        *,
        exclude_task_id: uuid.UUID | None = None,
    ) -> list[MessageRow]:
        """The last `limit` messages, oldest first (what an agent reads as history),
        leaving out the turn being answered (`exclude_task_id`) and every turn submitted
        after it: their user messages are stored at submission, while this turn may still
        be waiting its turn (busy policy `enqueue`), and they are not its past."""
        params: dict[str, Any] = {"tenant_id": tenant_id, "session_id": session_id, "limit": limit}
        statement = _LATEST
        if exclude_task_id is not None:
            statement, params["task_id"] = _LATEST_BEFORE_TASK, exclude_task_id
        rows = await MESSAGES.all(self.db, statement, params)
        rows.reverse()
        return rows

    async def add_once(
        self,
        *,
        tenant_id: str,
        session_id: uuid.UUID,
        message_id: uuid.UUID,
        role: str,
        content: str,
        task_id: uuid.UUID | None,
        metadata: dict[str, Any],
    ) -> MessageRow | None:
        """Insert unless this message (same id, or the assistant reply of the same task)
        exists: a retried task writes its reply once. The row when this call inserted it,
        None when it was there already."""
        values = {
            "id": message_id,
            "session_id": session_id,
            "tenant_id": tenant_id,
            "role": role,
            "content": content,
            "task_id": task_id,
            "metadata": metadata,
            "created_at": utcnow(),
        }
        statement = _ADD_ONCE[self.db.get_bind().dialect.name]
        result = await self.db.execute(statement, values)
        inserted = bool(getattr(result, "rowcount", 0))
        return MESSAGES.build(values) if inserted else None

    async def by_id(self, tenant_id: str, message_id: uuid.UUID) -> MessageRow | None:
        params = {"tenant_id": tenant_id, "message_id": message_id}
        return await MESSAGES.one(self.db, _BY_ID, params)
