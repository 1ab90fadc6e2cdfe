"""Task routes: read the ledger, follow a task's events (SSE), cancel."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse

from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import ValidationFailed
from agent_orchestrator.events.bus import REPLAY_PAGE, EventBus
from agent_orchestrator.events.models import (
    CURSOR_PATTERN,
    StreamKey,
    ends_task_stream,
    parse_cursor,
)
from agent_orchestrator.middleware.auth import require_scope
from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.principal import Principal, Scope
from agent_orchestrator.models.task import TERMINAL, TaskStatus, TaskView
from agent_orchestrator.routes.deps import Paging, State, UoW
from agent_orchestrator.routes.openapi import API_ERRORS, SSE_CONTENT, errors
from agent_orchestrator.routes.sse import event_frames, sse_response
from agent_orchestrator.services.task_ledger import to_view

router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"], responses=API_ERRORS)

TasksReader = Annotated[Principal, Depends(require_scope(Scope.TASKS_READ))]
TasksWriter = Annotated[Principal, Depends(require_scope(Scope.TASKS_WRITE))]


def cursor_from(last_event_id: str | None, after: str | None) -> int | None:
    """The client's cursor: `Last-Event-ID` (what an EventSource sends on reconnecting),
    else `after`. Both are checked whenever they are sent: an empty header must not let
    a bad `after` through unchecked."""
    header = _cursor("Last-Event-ID", last_event_id)
    return header if header is not None else _cursor("after", after)


def _cursor(field: str, raw: str | None) -> int | None:
    try:
        return parse_cursor(raw)
    except ValueError as error:
        raise ValidationFailed(
            f"{field} must be an event id",
            details=[{"field": field, "message": str(error)}],
        ) from error


#: How long after a task finished its final event may still be on its way to the log.
FINAL_EVENT_GRACE = timedelta(seconds=5)


async def nothing_more_to_stream(
    bus: EventBus, stream: StreamKey, row: TaskRow, cursor: int | None
) -> bool:
    """A finished task whose log holds nothing after the client's cursor, and never will:
    the client already has the terminal event (an EventSource reconnects whenever a
    stream ends, with the last id it saw), or the log no longer holds the task's events
    (EVENTS_TTL passed, or Redis lost them). Streaming would only wait forever."""
    if row.status not in TERMINAL or await bus.replay(stream, cursor, 1):
        return False
    after = None
    while True:
        page = await bus.replay(stream, after, REPLAY_PAGE)
        if any(ends_task_stream(event) for event in page):
            return True  # and it is at or before the cursor, since nothing is after it
        if len(page) < REPLAY_PAGE:
            break
        after = page[-1].cursor
    # No terminal event in the log: gone, unless the task finished a moment ago and its
    # final event is being published right now (then the live stream delivers it).
    return row.finished_at is not None and row.finished_at < utcnow() - FINAL_EVENT_GRACE


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
    task_id: uuid.UUID,
    principal: TasksReader,
    state: State,
    uow: UoW,
    # The pattern is documented, not enforced by FastAPI: cursor_from's 422 names the
    # header as clients send it ("Last-Event-ID"), not as FastAPI spells its alias.
    last_event_id: Annotated[
        str | None, Header(json_schema_extra={"pattern": CURSOR_PATTERN})
    ] = None,
    after: Annotated[
        str | None, Query(max_length=32, json_schema_extra={"pattern": CURSOR_PATTERN})
    ] = None,
) -> Response:
    cursor = cursor_from(last_event_id, after)
    row = await state.ledger.load_visible(uow.session, principal, task_id)
    stream = StreamKey("task", row.tenant_id, str(row.id))
    if await nothing_more_to_stream(state.bus, stream, row, cursor):
        # 204 also tells an EventSource to stop reconnecting.
        return Response(status_code=204)
    return sse_response(
        event_frames(
            state.bus,
            stream,
            cursor,
            is_last=ends_task_stream,
            keepalive_seconds=state.settings.sse_keepalive_seconds,
        )
    )


@router.post("/{task_id}/cancel", status_code=202, responses=errors(404, 409))
async def cancel_task(
    task_id: uuid.UUID, principal: TasksWriter, state: State, uow: UoW
) -> TaskView:
    row = await state.ledger.request_cancel(uow, principal, task_id)
    return to_view(row)
