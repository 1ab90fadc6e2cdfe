"""Conversation on our own database (embedded mode): the messages table."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.db.repositories.messages import MessageRepository
from agent_orchestrator.models.agent import ConversationMessage


class LocalConversation:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self.factory = factory

    async def get_history(
        self, ctx: CallContext, *, session_id: str, limit: int
    ) -> list[ConversationMessage]:
        async with self.factory() as db:
            rows = await MessageRepository(db).latest(
                ctx.tenant_id,
                uuid.UUID(session_id),
                limit,
                exclude_task_id=uuid.UUID(ctx.task_id) if ctx.task_id else None,
            )
        return [ConversationMessage(id=str(r.id), role=r.role, content=r.content) for r in rows]

    async def save_message(
        self,
        ctx: CallContext,
        *,
        session_id: str,
        message_id: str,
        role: str,
        content: str,
        task_id: str | None,
        metadata: dict[str, Any],
    ) -> None:
        async with self.factory() as db:
            await MessageRepository(db).add_once(
                tenant_id=ctx.tenant_id,
                session_id=uuid.UUID(session_id),
                message_id=uuid.UUID(message_id),
                role=role,
                content=content,
                task_id=uuid.UUID(task_id) if task_id else None,
                metadata=metadata,
            )
            await db.commit()
