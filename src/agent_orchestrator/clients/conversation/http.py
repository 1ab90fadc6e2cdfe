"""Conversation over HTTP."""

from __future__ import annotations

from typing import Any

from agent_orchestrator.clients.base import CallContext, DownstreamError, HttpServiceClient
from agent_orchestrator.models.agent import ConversationMessage


class HttpConversationClient(HttpServiceClient):
    service = "conversation"

    async def get_history(
        self, ctx: CallContext, *, session_id: str, limit: int
    ) -> list[ConversationMessage]:
        body = await self.request(
            ctx, "GET", f"v1/sessions/{session_id}/messages", params={"limit": limit}
        )
        try:
            return [ConversationMessage.model_validate(item) for item in body["messages"]]
        except (KeyError, TypeError, ValueError) as error:
            raise DownstreamError(
                self.service, "invalid_response", "no messages list", retryable=False
            ) from error

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
        await self.request(
            ctx,
            "POST",
            f"v1/sessions/{session_id}/messages",
            json_body={
                "id": message_id,
                "role": role,
                "content": content,
                "task_id": task_id,
                "metadata": metadata,
            },
        )
