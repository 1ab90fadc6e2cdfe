"""LLM providers: any OpenAI-compatible Chat Completions endpoint, or the echo model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from agent_orchestrator.models.agent import ExecutionEvent


class LLMProvider(Protocol):
    name: str

    def stream(
        self, messages: list[dict[str, Any]], *, model: str | None, temperature: float | None
    ) -> AsyncIterator[ExecutionEvent]: ...

    async def aclose(self) -> None: ...
