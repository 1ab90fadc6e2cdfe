"""Agent management over HTTP."""

from __future__ import annotations

from pydantic import ValidationError

from agent_orchestrator.clients.base import CallContext, DownstreamError, HttpServiceClient
from agent_orchestrator.models.agent import AgentConfig


class HttpAgentManagementClient(HttpServiceClient):
    service = "agent_management"

    async def get_agent(self, ctx: CallContext, *, agent_id: str) -> AgentConfig:
        body = await self.request(ctx, "GET", f"v1/agents/{agent_id}")
        try:
            return AgentConfig.model_validate(body)
        except ValidationError as error:
            raise DownstreamError(
                self.service, "invalid_response", "not an agent object", retryable=False
            ) from error
