"""Every query on messages. Each method takes the tenant and filters by it."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.tables import MessageRow, TaskRow
from agent_orchestrator.db.types import utcnow


class MessageRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, row: MessageRow) -> MessageRow:
        self.db.add(row)
        await self.db.flush()
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
        query = select(MessageRow).where(
            MessageRow.tenant_id == tenant_id, MessageRow.session_id == session_id
        )
        if exclude_task_id is not None:
            answering = select(TaskRow.created_at).where(
                TaskRow.tenant_id == tenant_id, TaskRow.id == exclude_task_id
            )
            later = select(TaskRow.id).where(
                TaskRow.tenant_id == tenant_id,
                TaskRow.session_id == session_id,
                TaskRow.created_at >= answering.scalar_subquery(),
            )
            query = query.where(
                MessageRow.task_id.is_(None)
                | ((MessageRow.task_id != exclude_task_id) & MessageRow.task_id.not_in(later))
            )
        query = query.order_by(MessageRow.created_at.desc(), MessageRow.id.desc()).limit(limit)
        rows = list((await self.db.execute(query)).scalars())
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
    ) -> bool:
        """Insert unless this message (same id, or the assistant reply of the same task)
        exists: a retried task writes its reply once. True when this call inserted it."""
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
        insert = pg_insert if self.db.get_bind().dialect.name == "postgresql" else sqlite_insert
        statement = insert(MessageRow).values(**values).on_conflict_do_nothing()
        result = await self.db.execute(statement)
        return bool(getattr(result, "rowcount", 0))

    async def by_id(self, tenant_id: str, message_id: uuid.UUID) -> MessageRow | None:
        query = select(MessageRow).where(
            MessageRow.tenant_id == tenant_id, MessageRow.id == message_id
        )
        return (await self.db.execute(query)).scalar_one_or_none()
