"""Every query on messages. Each method takes the tenant and filters by it."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.tables import MessageRow


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
