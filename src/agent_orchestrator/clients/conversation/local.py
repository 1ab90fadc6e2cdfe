"""Conversation on our own database (embedded mode): the messages table.

Differences from the HTTP service, both because the sessions are the orchestrator's own:
ids are UUIDs (a session id that is not one has no messages; a message, session or task
id that is not one is a `validation_error`), and a message can only be saved to a session
that exists (`not_found` otherwise), since sessions are created by the sessions API."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.clients.base import CallContext, DownstreamError
from agent_orchestrator.db.repositories.messages import MessageRepository
from agent_orchestrator.models.agent import ConversationMessage

SERVICE = "conversation"
ROLES = ("user", "assistant", "system", "tool")


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _uuid(value: str, what: str) -> uuid.UUID:
    parsed = _uuid_or_none(value)
    if parsed is None:
        raise DownstreamError(
            SERVICE, "validation_error", f"{what} {value!r} is not a UUID", retryable=False
        )
    return parsed


class LocalConversation:
    service = SERVICE

    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self.factory = factory

    async def get_history(
        self, ctx: CallContext, *, session_id: str, limit: int
    ) -> list[ConversationMessage]:
        session = _uuid_or_none(session_id)
        if session is None:
            return []
        async with self.factory() as db:
            rows = await MessageRepository(db).latest(
                ctx.tenant_id,
                session,
                limit,
                exclude_task_id=_uuid_or_none(ctx.task_id) if ctx.task_id else None,
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
        if role not in ROLES:
            raise DownstreamError(
                SERVICE, "validation_error", f"unknown role {role!r}", retryable=False
            )
        session = _uuid(session_id, "session_id")
        message = _uuid(message_id, "message id")
        task = _uuid(task_id, "task_id") if task_id else None
        async with self.factory() as db:
            try:
                await MessageRepository(db).add_once(
                    tenant_id=ctx.tenant_id,
                    session_id=session,
                    message_id=message,
                    role=role,
                    content=content,
                    task_id=task,
                    metadata=metadata,
                )
                await db.commit()
            except IntegrityError as error:
                # Conflicts on the id are absorbed by add_once; what is left is the
                # session's foreign key.
                raise DownstreamError(
                    SERVICE,
                    "not_found",
                    f"no session {session_id!r}",
                    retryable=False,
                    status=404,
                ) from error
