"""Audit trail: every state-changing operation records who, what, which resource, outcome."""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.audit import ENTRIES, AuditRepository
from agent_orchestrator.db.tables import AuditEntryRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.ids import new_id
from agent_orchestrator.models.principal import Principal


def _entry(
    principal: Principal,
    action: str,
    resource_type: str,
    resource_id: str | None,
    outcome: str,
    details: dict[str, Any] | None,
) -> AuditEntryRow:
    correlation_id = structlog.contextvars.get_contextvars().get("correlation_id")
    return ENTRIES.new(
        id=new_id(),
        tenant_id=principal.tenant_id,
        actor_id=principal.user_id,
        actor_kind=principal.kind.value,
        action=action,
        resource_type=resource_type,
        resource_id=resource_id,
        outcome=outcome,
        correlation_id=correlation_id,
        details=details or {},
        created_at=utcnow(),
    )


def record(
    uow: UnitOfWork,
    principal: Principal,
    action: str,
    resource_type: str,
    resource_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """A success, written with the operation's own commit (both commit or neither)."""
    uow.audit(_entry(principal, action, resource_type, resource_id, "success", details))


async def record_failure(
    factory: async_sessionmaker[AsyncSession],
    principal: Principal,
    action: str,
    resource_type: str,
    resource_id: str | None,
    code: str,
) -> None:
    """A refusal, in its own transaction since the operation's one was rolled back."""
    entry = _entry(principal, action, resource_type, resource_id, "failure", {"code": code})
    async with factory() as db:
        await AuditRepository(db).add(entry)
        await db.commit()
