"""Batch API models: BatchRequest in, BatchResponse (and its items' results) out."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent_orchestrator.models.storable import StorableJson, StorableText
from agent_orchestrator.models.task import TaskErrorInfo, TaskStatus


class BatchOperation(StrEnum):
    #: each item is a chat message, answered in a session of its own
    CHAT = "chat"


class BatchStatus(StrEnum):
    RUNNING = "running"  # some item is queued or running
    COMPLETED = "completed"  # every item has ended (the counts say how)
    CANCELLED = "cancelled"  # cancelled, and every item has ended


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: StorableText = Field(min_length=1, max_length=32_000)
    #: this item's agent, instead of the batch's
    agent_id: StorableText | None = Field(default=None, min_length=1, max_length=128)
    metadata: StorableJson = Field(default_factory=dict)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: BatchOperation = BatchOperation.CHAT
    #: at most BATCH_MAX_ITEMS (and the request at most MAX_REQUEST_BYTES)
    items: list[BatchItem] = Field(min_length=1)
    agent_id: StorableText | None = Field(default=None, min_length=1, max_length=128)
    #: items run at once; BATCH_DEFAULT_PARALLEL when absent, at most BATCH_MAX_PARALLEL
    max_parallel: int | None = Field(default=None, ge=1)
    #: POSTed, signed, once every item has ended (needs WEBHOOK_SECRET); an address
    #: inside the network is refused (clients/webhooks.py). No spaces or control
    #: characters: NUL would reach the database, the others have no place in a URL.
    callback_url: str | None = Field(
        default=None, min_length=1, max_length=2048, pattern=r"^https?://[^\x00-\x20\x7f]+$"
    )
    metadata: StorableJson = Field(default_factory=dict)


class BatchCounts(BaseModel):
    """A batch's items by status: every status named, zeros included."""

    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0


class BatchResponse(BaseModel):
    id: uuid.UUID
    operation: BatchOperation
    status: BatchStatus
    total: int
    #: items by status, read from the ledger
    counts: BatchCounts
    max_parallel: int
    cancel_requested: bool
    callback_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    events_url: str
    results_url: str


class BatchItemResult(BaseModel):
    #: the item's place in the request, from 0
    index: int
    task_id: uuid.UUID
    session_id: uuid.UUID | None
    status: TaskStatus
    #: a succeeded chat item: message_id, content, usage, degraded
    result: dict[str, Any] | None
    error: TaskErrorInfo | None
    finished_at: datetime | None
