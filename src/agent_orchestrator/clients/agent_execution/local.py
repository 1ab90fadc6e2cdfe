"""Agent execution without the service: the agent's prompt, the history and the knowledge
sources become a Chat Completions request to the configured LLM (or the echo model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from agent_orchestrator.clients.agent_execution import conversation_of
from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.clients.llm import LLMProvider
from agent_orchestrator.models.agent import AgentConfig, ConversationMessage, ExecutionEvent, Source


def prompt_messages(
    agent: AgentConfig, messages: list[ConversationMessage], sources: list[Source]
) -> list[dict[str, Any]]:
    system = agent.system_prompt
    if sources:
        listing = "\n".join(f"- {s.title}: {s.snippet}" for s in sources)
        system = f"{system}\n\nUse these sources when they help:\n{listing}".strip()
    prompt: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    prompt += [{"role": m.role, "content": m.content} for m in messages]
    return prompt


class LocalAgentExecution:
    service = "agent_execution"

    def __init__(self, llm: LLMProvider) -> None:
        self.llm = llm

    def execute(
        self,
        ctx: CallContext,
        *,
        agent: AgentConfig,
        history: list[ConversationMessage] | None,
        message: str,
        sources: list[Source] | None,
    ) -> AsyncIterator[ExecutionEvent]:
        return self.llm.stream(
            prompt_messages(agent, conversation_of(history, message), sources or []),
            model=agent.model,
            temperature=agent.temperature,
        )
