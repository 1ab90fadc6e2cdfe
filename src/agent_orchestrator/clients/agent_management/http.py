"""Agent management over HTTP."""

from __future__ import annotations

from pydantic import ValidationError

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    invalid_response,
    segment,
)
from agent_orchestrator.models.agent import AgentConfig


class HttpAgentManagementClient(HttpServiceClient):
    service = "agent_management"

    async def get_agent(self, ctx: CallContext, *, agent_id: str) -> AgentConfig:
        body = await self.request(ctx, "GET", f"v1/agents/{segment(agent_id)}")
        try:
            return AgentConfig.model_validate(body)
        except ValidationError as error:
            raise invalid_response(self.service, "not an agent object") from error
