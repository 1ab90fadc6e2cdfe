"""Ingestion over HTTP: POST /v1/ingestions, GET /v1/ingestions/{job_id}."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from agent_orchestrator.clients.base import (
    CallContext,
    DownstreamError,
    HttpServiceClient,
    invalid_response,
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
            headers={"Idempotency-Key": idempotency_key} if idempotency_key else None,
        )
        return self._job(body)

    async def status(self, ctx: CallContext, *, job_id: str) -> IngestionJob:
        return self._job(await self.request(ctx, "GET", f"v1/ingestions/{segment(job_id)}"))

    def _job(self, body: Any) -> IngestionJob:
        try:
            return IngestionJob.model_validate(body)
        except ValidationError as error:
            raise invalid_response(self.service, "not an ingestion job") from error
