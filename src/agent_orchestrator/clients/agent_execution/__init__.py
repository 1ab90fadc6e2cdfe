"""Agent execution: run an agent over a conversation, streaming the reply
(docs/contracts/agent-execution.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.models.agent import AgentConfig, ConversationMessage, ExecutionEvent, Source


class AgentExecutionClient(Protocol):
    def execute(
        self,
        ctx: CallContext,
        *,
        agent: AgentConfig,
        history: list[ConversationMessage] | None,
        message: str,
        sources: list[Source] | None,
    ) -> AsyncIterator[ExecutionEvent]: ...


def conversation_of(
    history: list[ConversationMessage] | None, message: str
) -> list[ConversationMessage]:
    """The history (oldest first) with the new user message last."""
    return [*(history or []), ConversationMessage(role="user", content=message)]
