"""Ingestion service: documents accepted for indexing, asynchronously
(docs/contracts/ingestion.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from agent_orchestrator.clients.base import CallContext

JobStatus = Literal["queued", "running", "succeeded", "failed"]


class Document(BaseModel):
    id: str = Field(min_length=1)
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    code: str = ""
    message: str = ""


class IngestionJob(BaseModel):
    job_id: str
    status: JobStatus
    #: May accompany a failed job.
    error: JobError | None = None

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


class IngestionClient(Protocol):
    async def ingest(
        self,
        ctx: CallContext,
        *,
        documents: Sequence[Document | Mapping[str, Any]],
        idempotency_key: str | None = None,
    ) -> IngestionJob:
        """Creates a job; with `idempotency_key`, a repeat returns the original job."""
        ...

    async def status(self, ctx: CallContext, *, job_id: str) -> IngestionJob: ...
