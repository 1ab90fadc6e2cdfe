"""Ingestion over HTTP: POST /v1/ingestions, GET /v1/ingestions/{job_id}."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from agent_orchestrator.clients.base import (
    CallContext,
    DownstreamError,
    HttpServiceClient,
    segment,
)
from agent_orchestrator.clients.ingestion import Document, IngestionJob


class HttpIngestionClient(HttpServiceClient):
    service = "ingestion"

    async def ingest(
        self,
        ctx: CallContext,
        *,
        documents: Sequence[Document | Mapping[str, Any]],
        idempotency_key: str | None = None,
    ) -> IngestionJob:
        try:
            payload = [Document.model_validate(d).model_dump() for d in documents]
        except ValidationError as error:
            raise DownstreamError(
                self.service, "validation_error", f"bad document: {error}", retryable=False
            ) from error
        if not payload:
            raise DownstreamError(
                self.service, "validation_error", "no documents to ingest", retryable=False
            )
        body = await self.request(
            ctx,
            "POST",
            "v1/ingestions",
            json_body={"documents": payload},
            idempotency_key=idempotency_key,
        )
        return self.parse(IngestionJob, body, "not an ingestion job")

    async def status(self, ctx: CallContext, *, job_id: str) -> IngestionJob:
        body = await self.request(ctx, "GET", f"v1/ingestions/{segment(job_id)}")
        return self.parse(IngestionJob, body, "not an ingestion job")
