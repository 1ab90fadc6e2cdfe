"""Task routes: read the ledger, follow a task's events (SSE), cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse

from agent_orchestrator.events.models import (
    StreamKey,
    ends_task_stream,
)
from agent_orchestrator.middleware.auth import require_scope
from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.principal import Principal, Scope
from agent_orchestrator.models.task import TERMINAL, TaskStatus, TaskView
from agent_orchestrator.routes.deps import Paging, State, UoW
from agent_orchestrator.routes.openapi import API_ERRORS, SSE_CONTENT, errors
from agent_orchestrator.routes.sse import EventCursor, finite_stream
from agent_orchestrator.services.task_views import to_view

router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"], responses=API_ERRORS)

TasksReader = Annotated[Principal, Depends(require_scope(Scope.TASKS_READ))]
TasksWriter = Annotated[Principal, Depends(require_scope(Scope.TASKS_WRITE))]


@router.get("")
async def list_tasks(
    principal: TasksReader,
    state: State,
    uow: UoW,
    paging: Paging,
    session_id: uuid.UUID | None = None,
    status: TaskStatus | None = None,
) -> Page[TaskView]:
    return await state.ledger.page(
        uow,
        principal,
        session_id=session_id,
        status=status,
        limit=paging.limit,
        cursor=paging.cursor,
    )


@router.get("/{task_id}", responses=errors(404))
async def get_task(task_id: uuid.UUID, principal: TasksReader, state: State, uow: UoW) -> TaskView:
    return await state.ledger.view(uow, principal, task_id)


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": SSE_CONTENT},
        204: {"description": "the task is finished and the client has its last event"},
        **errors(404),
    },
)
async def task_events(
    task_id: uuid.UUID, principal: TasksReader, state: State, uow: UoW, cursor: EventCursor
) -> Response:
    row = await state.ledger.load_visible(uow.session, principal, task_id)
    stream = StreamKey("task", row.tenant_id, str(row.id))
    return await finite_stream(
        state.bus,
        stream,
        is_last=ends_task_stream,
        finished_at=row.finished_at if row.status in TERMINAL else None,
        cursor=cursor,
        keepalive_seconds=state.settings.sse_keepalive_seconds,
    )


@router.post("/{task_id}/cancel", status_code=202, responses=errors(404, 409))
async def cancel_task(
    task_id: uuid.UUID, principal: TasksWriter, state: State, uow: UoW
) -> TaskView:
    row = await state.ledger.request_cancel(uow, principal, task_id)
    return to_view(row)
