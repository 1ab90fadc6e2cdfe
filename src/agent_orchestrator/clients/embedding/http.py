"""Embedding over HTTP: POST /v1/embeddings."""

from __future__ import annotations

from pydantic import BaseModel

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    invalid_response,
)


class _Embeddings(BaseModel):
    model: str
    embeddings: list[list[float]]


class HttpEmbeddingClient(HttpServiceClient):
    service = "embedding"

    async def embed(self, ctx: CallContext, *, texts: list[str]) -> list[list[float]]:
        body = await self.request(ctx, "POST", "v1/embeddings", json_body={"texts": texts})
        vectors = self.parse(_Embeddings, body, "not an embeddings object").embeddings
        if len(vectors) != len(texts):
            raise invalid_response(self.service, f"{len(vectors)} vectors for {len(texts)} texts")
        if len({len(vector) for vector in vectors}) > 1:
            raise invalid_response(self.service, "vectors of different lengths")
        return vectors
