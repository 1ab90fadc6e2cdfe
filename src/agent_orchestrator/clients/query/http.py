"""Query service over HTTP."""

from __future__ import annotations

from pydantic import ValidationError

from agent_orchestrator.clients.base import CallContext, HttpServiceClient, invalid_response
from agent_orchestrator.models.agent import Source


class HttpQueryClient(HttpServiceClient):
    service = "query"

    async def search(
        self, ctx: CallContext, *, query: str, collection_ids: list[str], top_k: int
    ) -> list[Source]:
        body = await self.request(
            ctx,
            "POST",
            "v1/search",
            json_body={"query": query, "collection_ids": collection_ids, "top_k": top_k},
        )
        try:
            return [Source.model_validate(item) for item in body["results"]]
        except (KeyError, TypeError, ValidationError) as error:
            raise invalid_response(self.service, "no results list") from error
