"""Every query on sessions. Each method takes the tenant and filters by it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.tables import SessionRow


class SessionRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, row: SessionRow) -> SessionRow:
        self.db.add(row)
        await self.db.flush()
        return row

    async def get(
        self, tenant_id: str, session_id: uuid.UUID, *, for_update: bool = False
    ) -> SessionRow | None:
        query = select(SessionRow).where(
            SessionRow.tenant_id == tenant_id, SessionRow.id == session_id
        )
        if for_update:
            query = query.with_for_update()
        result = await self.db.execute(query)
        return result.scalar_one_or_none()

    async def page(
        self,
        tenant_id: str,
        *,
        user_id: str | None,
        states: list[str] | None,
        expired_before: datetime | None,
        live_after: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[SessionRow], str | None]:
        """`states` filters stored states; `expired_before` / `live_after` split the live
        states by expiry so that the `expired` filter (derived, not stored) pages right."""
        query = select(SessionRow).where(SessionRow.tenant_id == tenant_id)
        if user_id is not None:
            query = query.where(SessionRow.user_id == user_id)
        if states is not None:
            query = query.where(SessionRow.state.in_(states))
        if expired_before is not None:
            query = query.where(SessionRow.expires_at <= expired_before)
        if live_after is not None:
            query = query.where(SessionRow.expires_at > live_after)
        query = keyset_page(query, SessionRow.created_at, SessionRow.id, limit=limit, cursor=cursor)
        rows = list((await self.db.execute(query)).scalars())
        return split_page(rows, limit, lambda row: (row.created_at, row.id))

    async def transition(
        self,
        tenant_id: str,
        session_id: uuid.UUID,
        *,
        sources: list[str],
        live_at: datetime,
        values: dict[str, Any],
    ) -> SessionRow | None:
        """Move a session that is in one of `sources` and not expired at `live_at`."""
        statement = (
            update(SessionRow)
            .where(
                SessionRow.tenant_id == tenant_id,
                SessionRow.id == session_id,
                SessionRow.state.in_(sources),
                SessionRow.expires_at > live_at,
            )
            .values(**values)
            .returning(SessionRow)
            .execution_options(synchronize_session=False, populate_existing=True)
        )
        return (await self.db.execute(statement)).scalar_one_or_none()

    async def update(self, row: SessionRow, **values: Any) -> SessionRow:
        for name, value in values.items():
            setattr(row, name, value)
        await self.db.flush()
        return row
