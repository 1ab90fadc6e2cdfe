"""Chat routes: submit a turn (async, wait or stream) and cancel one."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel

from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.messages import MessageRepository
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.events.models import Event, StreamKey, ends_task_stream
from agent_orchestrator.middleware.auth import require_scope
from agent_orchestrator.models.chat import ChatAccepted, ChatMode, ChatRequest, ChatResponse
from agent_orchestrator.models.principal import Principal, Scope
from agent_orchestrator.models.task import TERMINAL, TaskView
from agent_orchestrator.observability.metrics import CHAT_WAIT_ANSWERS
from agent_orchestrator.routes.deps import IdempotencyKey, State, UoW
from agent_orchestrator.routes.openapi import API_ERRORS, SSE_CONTENT, errors
from agent_orchestrator.routes.sse import event_frames, finite_stream, sse_response
from agent_orchestrator.services.orchestrator import CHAT_KIND, reply_message_id
from agent_orchestrator.services.session_manager import to_message
from agent_orchestrator.services.task_views import to_view
from agent_orchestrator.state import AppState

router = APIRouter(prefix="/api/v1/chat", tags=["chat"], responses=API_ERRORS)

ChatWriter = Annotated[Principal, Depends(require_scope(Scope.CHAT_WRITE))]


@router.post(
    "",
    status_code=202,
    response_model=ChatAccepted,
    responses={
        200: {
            "model": ChatResponse,
            "description": "mode=wait: the finished turn (JSON); mode=stream: its events (SSE)",
            "content": SSE_CONTENT,
        },
        202: {"model": ChatAccepted, "description": "mode=async: the turn is queued"},
        204: {
            "description": "mode=stream, a repeated Idempotency-Key of a turn that ended "
            "and whose events are no longer kept (EVENTS_TTL): nothing to stream; read the "
            "turn with mode=wait or GET /api/v1/tasks/{id}"
        },
        **errors(400, 404, 409, 413),
    },
)
async def chat(
    body: ChatRequest,
    principal: ChatWriter,
    state: State,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    # The unit of work is opened here rather than taken as the `UoW` dependency: FastAPI's
    # generator dependencies (exit stack, cancel scope, context manager) cost more than
    # the rest of the route's dependencies together, on the path every turn takes.
    # Leaving the block commits, before the task is followed or the answer is sent.
    expected: uuid.UUID | None = None
    async with contextlib.AsyncExitStack() as following:
        followed: AsyncIterator[Event] | None = None
        try:
            async with UnitOfWork(state.db_factory) as uow:
                submitted = await state.orchestrator.submit(uow, principal, body, idempotency_key)
                task = submitted.task
                if body.mode is ChatMode.WAIT:
                    # Before the commit, whose hook enqueues the turn: a worker of this
                    # process may finish it before the commit returns.
                    expected = task.id
                    state.turn_results.expect(expected)
                    if submitted.created:
                        # Followed from before its first event, which the commit's hook
                        # publishes: nothing to replay (a round trip to Redis saved).
                        live = state.bus.subscribe(_task_stream(task), replay=False)
                        followed = await following.enter_async_context(live)
            assert task.session_id is not None
            if body.mode is ChatMode.ASYNC:
                accepted = ChatAccepted(
                    task_id=task.id,
                    session_id=task.session_id,
                    status=task.status,
                    events_url=f"/api/v1/tasks/{task.id}/events",
                )
                return _json(accepted, 202)
            if body.mode is ChatMode.STREAM:
                if not submitted.created:  # a repeat: its turn may have ended long ago
                    return await finite_stream(
                        state.bus,
                        _task_stream(task),
                        is_last=ends_task_stream,
                        finished_at=task.finished_at,
                        cursor=None,
                        keepalive_seconds=state.settings.sse_keepalive_seconds,
                    )
                return sse_response(
                    event_frames(
                        state.bus,
                        _task_stream(task),
                        None,
                        is_last=ends_task_stream,
                        keepalive_seconds=state.settings.sse_keepalive_seconds,
                    )
                )
            if task.status not in TERMINAL:  # a repeat of an ended turn: read it back
                await _wait_until_settled(state, _task_stream(task), followed)
        finally:
            handed_over = state.turn_results.take(expected) if expected is not None else None
    if handed_over is not None:
        CHAT_WAIT_ANSWERS.labels("handed_over").inc()
        return Response(handed_over, status_code=200, media_type="application/json")
    CHAT_WAIT_ANSWERS.labels("read_back").inc()
    return _json(await _finished_turn(state, principal, task.id), 200)


def _task_stream(task: TaskRow) -> StreamKey:
    return StreamKey("task", task.tenant_id, str(task.id))


@router.post("/{task_id}/cancel", status_code=202, responses=errors(404, 409))
async def cancel_chat(
    task_id: uuid.UUID, principal: ChatWriter, state: State, uow: UoW
) -> TaskView:
    return to_view(await state.ledger.request_cancel(uow, principal, task_id, kind=CHAT_KIND))


def _json(body: BaseModel, status: int) -> Response:
    # Serialised by pydantic-core straight to JSON: the same bytes as JSONResponse over
    # model_dump(mode="json"), without the intermediate dicts and the stdlib encoder.
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


async def _wait_until_settled(
    state: AppState, stream: StreamKey, followed: AsyncIterator[Event] | None
) -> None:
    """Follow the task's events (`followed`, or the stream from its start) until a
    terminal status, for at most TASK_TIMEOUT plus the time a lost worker takes to be
    noticed."""
    bound = state.settings.task_timeout + state.settings.lease_ttl + 5
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound):
            if followed is not None:
                await _until_terminal(followed)
                return
            async with state.bus.subscribe(stream) as events:
                await _until_terminal(events)


async def _until_terminal(events: AsyncIterator[Event]) -> None:
    async for event in events:
        if ends_task_stream(event):
            return


async def _finished_turn(state: AppState, principal: Principal, task_id: uuid.UUID) -> ChatResponse:
    # Three lookups, none of which needs to see the others' snapshot: the reply, the
    # steps and the terminal status were committed before the event we waited for.
    async with UnitOfWork(state.db_single) as uow:
        view = await state.ledger.view(uow, principal, task_id)
        message = None
        if view.status in TERMINAL and view.session_id is not None:
            row = await MessageRepository(uow.session).by_id(
                principal.tenant_id, reply_message_id(task_id)
            )
            message = to_message(row) if row is not None else None
    return ChatResponse(task=view, message=message)
