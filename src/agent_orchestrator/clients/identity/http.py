"""Identity over HTTP: POST /v1/introspect."""

from __future__ import annotations

from pydantic import ValidationError

from agent_orchestrator.clients.base import CallContext, HttpServiceClient, invalid_response
from agent_orchestrator.clients.identity import TokenInfo


class HttpIdentityClient(HttpServiceClient):
    service = "identity"

    async def introspect(self, ctx: CallContext, *, token: str) -> TokenInfo:
        body = await self.request(ctx, "POST", "v1/introspect", json_body={"token": token})
        try:
            return TokenInfo.model_validate(body)
        except ValidationError as error:
            raise invalid_response(self.service, "not an introspection answer") from error
