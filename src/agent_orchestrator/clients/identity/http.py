"""Identity over HTTP: POST /v1/introspect."""

from __future__ import annotations

from agent_orchestrator.clients.base import CallContext, HttpServiceClient
from agent_orchestrator.clients.identity import TokenInfo


class HttpIdentityClient(HttpServiceClient):
    service = "identity"

    async def introspect(self, ctx: CallContext, *, token: str) -> TokenInfo:
        body = await self.request(ctx, "POST", "v1/introspect", json_body={"token": token})
        return self.parse(TokenInfo, body, "not an introspection answer")
