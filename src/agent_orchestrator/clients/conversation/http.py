"""Conversation over HTTP."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    invalid_response,
    segment,
)
from agent_orchestrator.models.agent import ConversationMessage

#: A history is up to HISTORY_LIMIT messages: validated in one pass, not one call each.
_MESSAGES = TypeAdapter(list[ConversationMessage])


class HttpConversationClient(HttpServiceClient):
    service = "conversation"

    async def get_history(
        self, ctx: CallContext, *, session_id: str, limit: int
    ) -> list[ConversationMessage]:
        body = await self.request(
            ctx, "GET", f"v1/sessions/{segment(session_id)}/messages", params={"limit": limit}
        )
        try:
            return _MESSAGES.validate_python(body["messages"])
        except (KeyError, TypeError, ValueError) as error:
            raise invalid_response(self.service, "no messages list") from error

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
        body = await self.request(
            ctx,
            "POST",
            f"v1/sessions/{segment(session_id)}/messages",
            json_body={
                "id": message_id,
                "role": role,
                "content": content,
                "task_id": task_id,
                "metadata": metadata,
            },
        )
        if not isinstance(body, dict) or "id" not in body:
            raise invalid_response(self.service, "no `id` in the answer")
