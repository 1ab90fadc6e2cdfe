"""`/internal/v1/*`: for other platform services, authenticated by the service token only;
the tenant a call acts for is its `X-Tenant-ID`."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from agent_orchestrator.middleware.auth import require_service
from agent_orchestrator.models.internal import ServiceEvent, ServiceEventAccepted, SessionContext
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.routes.deps import IdempotencyKey, State, UoW
from agent_orchestrator.routes.openapi import errors

# 422 on every route: a missing or over-long X-Tenant-ID (middleware/auth.py).
router = APIRouter(prefix="/internal/v1", tags=["internal"], responses=errors(401, 422))

ServicePrincipal = Annotated[Principal, Depends(require_service)]


@router.get("/ping")
async def ping(principal: ServicePrincipal) -> dict[str, str]:
    return {"status": "ok", "tenant_id": principal.tenant_id}


@router.get("/sessions/{session_id}/context", responses=errors(404, 422))
async def session_context(
    session_id: uuid.UUID,
    principal: ServicePrincipal,
    state: State,
    uow: UoW,
    last: Annotated[int, Query(ge=0, le=1000, description="how many of the last messages")] = 50,
) -> SessionContext:
    """The session and its `last` messages, oldest first."""
    session, messages = await state.sessions.context(uow, principal, session_id, last=last)
    return SessionContext(session=session, messages=messages)


@router.post(
    "/sessions/{session_id}/events",
    status_code=202,
    responses={
        200: {"model": ServiceEventAccepted, "description": "a repeat, dropped"},
        **errors(400, 404, 409, 413, 422),
    },
)
async def publish_event(
    session_id: uuid.UUID,
    body: ServiceEvent,
    principal: ServicePrincipal,
    state: State,
    uow: UoW,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ServiceEventAccepted:
    """Publish an event to the session's subscribers (and the task's, with `task_id`)."""
    accepted = await state.service_events.publish(uow, principal, session_id, body, idempotency_key)
    if accepted.duplicate:
        response.status_code = 200
    return accepted
