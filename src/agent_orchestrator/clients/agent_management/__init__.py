"""Agent management: an agent's configuration (docs/contracts/agent-management.md)."""

from __future__ import annotations

from typing import Protocol

from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.models.agent import AgentConfig


class AgentManagementClient(Protocol):
    async def get_agent(self, ctx: CallContext, *, agent_id: str) -> AgentConfig: ...
