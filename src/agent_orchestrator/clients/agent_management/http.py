"""Agent management over HTTP."""

from __future__ import annotations

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    segment,
)
from agent_orchestrator.models.agent import AgentConfig


class HttpAgentManagementClient(HttpServiceClient):
    service = "agent_management"

    async def get_agent(self, ctx: CallContext, *, agent_id: str) -> AgentConfig:
        body = await self.request(ctx, "GET", f"v1/agents/{segment(agent_id)}")
        return self.parse(AgentConfig, body, "not an agent object")
