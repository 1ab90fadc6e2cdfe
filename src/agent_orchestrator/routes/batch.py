"""Batch routes: submit a batch, read it and its items' results, follow it, cancel it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse

from agent_orchestrator.events.models import StreamKey, ends_batch_stream
from agent_orchestrator.middleware.auth import require_scope
from agent_orchestrator.models.batch import BatchItemResult, BatchRequest, BatchResponse
from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.principal import Principal, Scope
from agent_orchestrator.models.task import TaskStatus
from agent_orchestrator.routes.deps import IdempotencyKey, Paging, State, UoW
from agent_orchestrator.routes.openapi import API_ERRORS, SSE_CONTENT, errors
from agent_orchestrator.routes.sse import EventCursor, finite_stream

router = APIRouter(prefix="/api/v1/batch", tags=["batch"], responses=API_ERRORS)

BatchReader = Annotated[Principal, Depends(require_scope(Scope.BATCH_READ))]
BatchWriter = Annotated[Principal, Depends(require_scope(Scope.BATCH_WRITE))]


@router.post("", status_code=202, responses=errors(409, 413))
async def submit_batch(
    body: BatchRequest,
    principal: BatchWriter,
    state: State,
    uow: UoW,
    idempotency_key: IdempotencyKey = None,
) -> BatchResponse:
    """Queue one task per item; they run `max_parallel` at a time. A repeated
    `Idempotency-Key` answers with the batch it created."""
    batch, _ = await state.batches.submit(uow, principal, body, idempotency_key)
    return batch


@router.get("")
async def list_batches(
    principal: BatchReader, state: State, uow: UoW, paging: Paging
) -> Page[BatchResponse]:
    return await state.batches.page(uow, principal, limit=paging.limit, cursor=paging.cursor)


@router.get("/{batch_id}", responses=errors(404))
async def get_batch(
    batch_id: uuid.UUID, principal: BatchReader, state: State, uow: UoW
) -> BatchResponse:
    return await state.batches.view(uow, principal, batch_id)


@router.get("/{batch_id}/results", responses=errors(404))
async def batch_results(
    batch_id: uuid.UUID,
    principal: BatchReader,
    state: State,
    uow: UoW,
    paging: Paging,
    status: TaskStatus | None = None,
) -> Page[BatchItemResult]:
    """The items in the order they were given, with each one's status and result."""
    return await state.batches.results(
        uow, principal, batch_id, status=status, limit=paging.limit, cursor=paging.cursor
    )


@router.get(
    "/{batch_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": SSE_CONTENT},
        204: {"description": "the batch has ended and the client has its last event"},
        **errors(404),
    },
)
async def batch_events(
    batch_id: uuid.UUID, principal: BatchReader, state: State, uow: UoW, cursor: EventCursor
) -> Response:
    """`batch.progress` events until the one whose status is final (`completed` or
    `cancelled`); resumable with `Last-Event-ID` like a task's events."""
    row = await state.batches.load_visible(uow.session, principal, batch_id)
    stream = StreamKey("batch", row.tenant_id, str(row.id))
    return await finite_stream(
        state.bus,
        stream,
        is_last=ends_batch_stream,
        finished_at=row.finished_at,
        cursor=cursor,
        keepalive_seconds=state.settings.sse_keepalive_seconds,
    )


@router.post("/{batch_id}/cancel", status_code=202, responses=errors(404, 409))
async def cancel_batch(
    batch_id: uuid.UUID, principal: BatchWriter, state: State, uow: UoW
) -> BatchResponse:
    """Queued items are cancelled at once and running ones stopped; the batch is
    `cancelled` once the last of them has ended."""
    return await state.batches.cancel(uow, principal, batch_id)
