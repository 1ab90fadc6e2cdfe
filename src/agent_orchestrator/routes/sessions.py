"""Session routes: parse, call the session manager, shape the response."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.session import (
    Message,
    Session,
    SessionCreate,
    SessionState,
    SessionUpdate,
)
from agent_orchestrator.routes.deps import Paging, SessionsReader, SessionsWriter, State, UoW
from agent_orchestrator.routes.openapi import API_ERRORS, errors

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"], responses=API_ERRORS)


@router.post("", status_code=201, responses=errors(400, 413))
async def create_session(
    body: SessionCreate, principal: SessionsWriter, state: State, uow: UoW
) -> Session:
    return await state.sessions.create(uow, principal, body)


@router.get("")
async def list_sessions(
    principal: SessionsReader,
    state: State,
    uow: UoW,
    paging: Paging,
    state_filter: Annotated[SessionState | None, Query(alias="state")] = None,
) -> Page[Session]:
    return await state.sessions.page(
        uow, principal, state=state_filter, limit=paging.limit, cursor=paging.cursor
    )


@router.get("/{session_id}", responses=errors(404))
async def get_session(
    session_id: uuid.UUID, principal: SessionsReader, state: State, uow: UoW
) -> Session:
    return await state.sessions.get(uow, principal, session_id)


@router.patch("/{session_id}", responses=errors(400, 404, 409, 413))
async def update_session(
    session_id: uuid.UUID,
    body: SessionUpdate,
    principal: SessionsWriter,
    state: State,
    uow: UoW,
) -> Session:
    return await state.sessions.update(uow, principal, session_id, body)


@router.delete("/{session_id}", responses=errors(404, 409))
async def close_session(
    session_id: uuid.UUID, principal: SessionsWriter, state: State, uow: UoW
) -> Session:
    return await state.sessions.close(uow, principal, session_id)


@router.get("/{session_id}/messages", responses=errors(404))
async def list_messages(
    session_id: uuid.UUID, principal: SessionsReader, state: State, uow: UoW, paging: Paging
) -> Page[Message]:
    return await state.sessions.messages(
        uow, principal, session_id, limit=paging.limit, cursor=paging.cursor
    )
