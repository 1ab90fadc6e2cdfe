"""Query service over HTTP."""

from __future__ import annotations

from pydantic import ValidationError

from agent_orchestrator.clients.base import CallContext, DownstreamError, HttpServiceClient
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
            raise DownstreamError(
                self.service, "invalid_response", "no results list", retryable=False
            ) from error
