"""Audit entries: who did what to which resource, with what outcome."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.tables import AuditEntryRow

ENTRIES = RowCodec(AuditEntryRow)


class AuditRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, *rows: AuditEntryRow) -> None:
        await ENTRIES.add(self.db, *rows)

    async def list_for_resource(self, tenant_id: str, resource_id: str) -> list[AuditEntryRow]:
        query = (
            select(AuditEntryRow)
            .where(AuditEntryRow.tenant_id == tenant_id, AuditEntryRow.resource_id == resource_id)
            .order_by(AuditEntryRow.created_at)
        )
        return list((await self.db.execute(query)).scalars())
