"""Dependency aliases shared by the routers: state, unit of work, principal by scope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request

from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.errors import ValidationFailed, field_problem
from agent_orchestrator.middleware.auth import require_scope
from agent_orchestrator.models.principal import Principal, Scope
from agent_orchestrator.state import AppState


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.core
    return state


# Dependencies are coroutines: FastAPI runs a plain `def` dependency in its thread pool,
# a hand-off per request (~170 us of CPU on a session listing) for an attribute lookup.
async def get_state(request: Request) -> AppState:
    return app_state(request)


async def get_uow(request: Request) -> AsyncIterator[UnitOfWork]:
    # scope="function" below: commit before the response is sent, so a client never sees
    # a 2xx for a write that then fails to commit.
    async with UnitOfWork(app_state(request).db_factory) as uow:
        yield uow


State = Annotated[AppState, Depends(get_state)]
UoW = Annotated[UnitOfWork, Depends(get_uow, scope="function")]

SessionsReader = Annotated[Principal, Depends(require_scope(Scope.SESSIONS_READ))]
SessionsWriter = Annotated[Principal, Depends(require_scope(Scope.SESSIONS_WRITE))]


@dataclass(frozen=True)
class PageParams:
    limit: int
    cursor: str | None


async def page_params(
    request: Request,
    limit: Annotated[int | None, Query(ge=1, description="page size")] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> PageParams:
    """`limit` (bounded by MAX_PAGE_SIZE; over it is a 422 naming `limit`) and `cursor`."""
    settings = app_state(request).settings
    if limit is not None and limit > settings.max_page_size:
        raise ValidationFailed(
            f"limit must be at most {settings.max_page_size}",
            details=[field_problem("limit", "query", f"at most {settings.max_page_size}")],
        )
    return PageParams(limit or settings.default_page_size, cursor)


Paging = Annotated[PageParams, Depends(page_params)]

#: The `Idempotency-Key` request header: 1-255 characters (an empty one is a 422, not a
#: key that every keyless-looking request would share).
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255)]
