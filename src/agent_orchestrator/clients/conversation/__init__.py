"""Conversation service: history in, messages out (docs/contracts/conversation.md)."""

from __future__ import annotations

from typing import Any, Protocol

from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.models.agent import ConversationMessage


class ConversationClient(Protocol):
    async def get_history(
        self, ctx: CallContext, *, session_id: str, limit: int
    ) -> list[ConversationMessage]: ...

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
    ) -> None: ...
