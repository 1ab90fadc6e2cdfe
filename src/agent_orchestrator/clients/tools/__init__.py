"""Tool registry: the tools an agent may use, and invoking one
(docs/contracts/tool-registry.md)."""

from __future__ import annotations

import builtins
from typing import Any, Protocol

from pydantic import BaseModel, Field

from agent_orchestrator.clients.base import CallContext


class Tool(BaseModel):
    id: str
    name: str
    description: str = ""
    #: JSON Schema of the `arguments` object (OpenAI function-calling shape).
    parameters: dict[str, Any] = Field(default_factory=dict)


class ToolsClient(Protocol):
    async def list(self, ctx: CallContext) -> builtins.list[Tool]: ...

    async def invoke(self, ctx: CallContext, *, tool_id: str, arguments: dict[str, Any]) -> Any:
        """The tool's `result` (any JSON value). Not assumed safe to repeat."""
        ...
