"""Session lifecycle: create, read, list, patch, close, sliding expiry, hot copy.

A user sees the sessions they own; service principals and `admin` see the whole tenant.
Anything outside that (another tenant, another user) is `not_found`, never `forbidden`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.prepared import Bound
from agent_orchestrator.db.repositories.messages import MessageRepository
from agent_orchestrator.db.repositories.sessions import (
    SESSIONS,
    SessionRepository,
    transition_call,
)
from agent_orchestrator.db.tables import MessageRow, SessionRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import NotFound, ServiceError
from agent_orchestrator.events.bus import KeyWrite
from agent_orchestrator.ids import new_id
from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.principal import Principal, PrincipalKind, Scope
from agent_orchestrator.models.session import (
    EDITABLE,
    TRANSITIONS,
    Message,
    Session,
    SessionCreate,
    SessionState,
    SessionUpdate,
    effective_state,
    ensure_editable,
    ensure_transition,
)
from agent_orchestrator.observability import audit
from agent_orchestrator.observability.metrics import SESSIONS_CREATED
from agent_orchestrator.services.session_cache import SessionCache


def sees_whole_tenant(principal: Principal) -> bool:
    return principal.kind is PrincipalKind.SERVICE or Scope.ADMIN.value in principal.scopes


def may_see(principal: Principal, owner_id: str) -> bool:
    """Whether a row of the principal's tenant owned by `owner_id` (a session, a task, a
    batch) is visible to it: its owner's, and the whole tenant's for an admin or a service."""
    return owner_id == principal.user_id or sees_whole_tenant(principal)


def to_session(row: SessionRow, now: datetime) -> Session:
    return Session(
        id=row.id,
        tenant_id=row.tenant_id,
        user_id=row.user_id,
        agent_id=row.agent_id,
        state=effective_state(SessionState(row.state), row.expires_at, now),
        metadata=row.metadata_,
        created_at=row.created_at,
        last_activity_at=row.last_activity_at,
        expires_at=row.expires_at,
    )


def to_message(row: MessageRow) -> Message:
    return Message(
        id=row.id,
        session_id=row.session_id,
        role=row.role,
        content=row.content,
        task_id=row.task_id,
        metadata=row.metadata_,
        created_at=row.created_at,
    )


class SessionManager:
    def __init__(self, *, ttl_seconds: int, cache: SessionCache) -> None:
        self.ttl = timedelta(seconds=ttl_seconds)
        self.cache = cache

    # --- reads ------------------------------------------------------------------------
    async def get(self, uow: UnitOfWork, principal: Principal, session_id: uuid.UUID) -> Session:
        now = utcnow()
        cached = await self.cache.get(principal.tenant_id, str(session_id))
        if cached is not None:
            self._check_visible(principal, cached.user_id, session_id)
            state = effective_state(cached.state, cached.expires_at, now)
            return cached.model_copy(update={"state": state})
        row = await self._load(uow, principal, session_id)
        session = to_session(row, now)
        await self._cache(session, now)
        return session

    async def read_truth(
        self,
        uow: UnitOfWork,
        principal: Principal,
        session_id: uuid.UUID,
        *,
        for_update: bool = False,
    ) -> Session:
        """The session from the database, never from the hot copy: for decisions that
        write (accepting a chat turn), where a stale copy must not be trusted; with
        `for_update`, its row locked until the transaction ends (PostgreSQL)."""
        row = await self._load(uow, principal, session_id, for_update=for_update)
        return to_session(row, utcnow())

    async def page(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        state: SessionState | None,
        limit: int,
        cursor: str | None,
    ) -> Page[Session]:
        now = utcnow()
        live = [SessionState.ACTIVE.value, SessionState.PROCESSING.value]
        filters: dict[str, object] = {"states": None, "expired_before": None, "live_after": None}
        if state is SessionState.EXPIRED:
            filters.update(states=live, expired_before=now)
        elif state in (SessionState.ACTIVE, SessionState.PROCESSING):
            filters.update(states=[state.value], live_after=now)
        elif state is SessionState.CLOSED:
            filters.update(states=[SessionState.CLOSED.value])
        rows, next_cursor = await SessionRepository(uow.session).page(
            principal.tenant_id,
            user_id=None if sees_whole_tenant(principal) else principal.user_id,
            limit=limit,
            cursor=cursor,
            **filters,  # type: ignore[arg-type]
        )
        return Page(items=[to_session(row, now) for row in rows], next_cursor=next_cursor)

    async def messages(
        self,
        uow: UnitOfWork,
        principal: Principal,
        session_id: uuid.UUID,
        *,
        limit: int,
        cursor: str | None,
    ) -> Page[Message]:
        await self._load(uow, principal, session_id)
        rows, next_cursor = await MessageRepository(uow.session).list_for_session(
            principal.tenant_id, session_id, limit=limit, cursor=cursor
        )
        return Page(items=[to_message(row) for row in rows], next_cursor=next_cursor)

    async def context(
        self, uow: UnitOfWork, principal: Principal, session_id: uuid.UUID, *, last: int
    ) -> tuple[Session, list[Message]]:
        """The session and its `last` messages, oldest first (what another platform
        service reads of it)."""
        session = await self.get(uow, principal, session_id)
        rows = await MessageRepository(uow.session).latest(principal.tenant_id, session_id, last)
        return session, [to_message(row) for row in rows]

    # --- writes -----------------------------------------------------------------------
    async def create(
        self,
        uow: UnitOfWork,
        principal: Principal,
        body: SessionCreate,
        *,
        session_id: uuid.UUID | None = None,
        hot_copy: bool = True,
    ) -> Session:
        """A new session. `hot_copy=False` writes no hot copy: for the session of a chat
        turn, whose worker writes one as it claims the turn (`processing`); one written
        here, after the turn's enqueue, could land after that and say `active`."""
        now = utcnow()
        row = SESSIONS.new(
            id=session_id or new_id(),
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            agent_id=body.agent_id,
            state=SessionState.ACTIVE.value,
            metadata_=body.metadata,
            created_at=now,
            last_activity_at=now,
            expires_at=now + self.ttl,
            closed_at=None,
        )
        async with self._audited(uow, principal, "session.create", None):
            uow.insert_at_commit(SESSIONS, row)  # nothing reads it back before the commit
            audit.record(uow, principal, "session.create", "session", str(row.id))
        SESSIONS_CREATED.inc()
        if not hot_copy:
            return to_session(row, now)
        return self._after_write(uow, row, now)

    async def update(
        self, uow: UnitOfWork, principal: Principal, session_id: uuid.UUID, body: SessionUpdate
    ) -> Session:
        now = utcnow()
        async with self._audited(uow, principal, "session.update", session_id):
            row = await self._load(uow, principal, session_id, for_update=True)
            ensure_editable(effective_state(SessionState(row.state), row.expires_at, now))
            changes = body.model_dump(exclude_unset=True)
            values: dict[str, object] = {"last_activity_at": now, "expires_at": now + self.ttl}
            if "agent_id" in changes:
                values["agent_id"] = changes["agent_id"]
            if changes.get("metadata") is not None:
                values["metadata_"] = changes["metadata"]
            await SessionRepository(uow.session).update(row, **values)
            audit.record(
                uow,
                principal,
                "session.update",
                "session",
                str(session_id),
                {"fields": sorted(changes)},
            )
        return self._after_write(uow, row, now)

    async def close(self, uow: UnitOfWork, principal: Principal, session_id: uuid.UUID) -> Session:
        now = utcnow()
        async with self._audited(uow, principal, "session.close", session_id):
            row = await self._load(uow, principal, session_id, for_update=True)
            current = effective_state(SessionState(row.state), row.expires_at, now)
            ensure_transition(current, SessionState.CLOSED)
            await SessionRepository(uow.session).update(
                row, state=SessionState.CLOSED.value, closed_at=now
            )
            audit.record(uow, principal, "session.close", "session", str(session_id))
        return self._after_write(uow, row, now)

    async def mark_turn(
        self, db: AsyncSession, tenant_id: str, session_id: uuid.UUID, target: SessionState
    ) -> Session | None:
        """A worker moves its session between active and processing. A session that was
        closed or expired meanwhile stays as it is (the turn still finishes)."""
        now = utcnow()
        row = await SESSIONS.one(db, *self.turn_mark(tenant_id, session_id, target, now))
        return None if row is None else to_session(row, now)

    def turn_mark(
        self, tenant_id: str, session_id: uuid.UUID, target: SessionState, now: datetime
    ) -> Bound:
        """`mark_turn`'s statement, for a caller that sends it with others; `to_session`
        (with the same `now`) makes its row a Session."""
        sources = [state.value for state in EDITABLE if target in TRANSITIONS[state]]
        values = {"state": target.value, "last_activity_at": now, "expires_at": now + self.ttl}
        return transition_call(tenant_id, session_id, sources, now, values)

    async def hot_copy_write(self, session: Session) -> KeyWrite | None:
        """The session's hot copy, for a caller that publishes events next and hands them
        this write (None: written already, or nothing to write)."""
        return await self._cache(session, utcnow(), later=True)

    # --- helpers ----------------------------------------------------------------------
    async def _load(
        self,
        uow: UnitOfWork,
        principal: Principal,
        session_id: uuid.UUID,
        *,
        for_update: bool = False,
    ) -> SessionRow:
        row = await SessionRepository(uow.session).get(
            principal.tenant_id, session_id, for_update=for_update
        )
        if row is None:
            raise _not_found(session_id)
        self._check_visible(principal, row.user_id, session_id)
        return row

    def _check_visible(self, principal: Principal, owner: str, session_id: uuid.UUID) -> None:
        if not may_see(principal, owner):
            raise _not_found(session_id)

    def _after_write(self, uow: UnitOfWork, row: SessionRow, now: datetime) -> Session:
        session = to_session(row, now)

        async def refresh_hot_copy() -> None:
            await self._cache(session, now)

        uow.after_commit(refresh_hot_copy)
        return session

    async def _cache(
        self, session: Session, now: datetime, *, later: bool = False
    ) -> KeyWrite | None:
        """Refresh the hot copy: none for a closed session, the remaining lifetime as its
        TTL. `later`: the write is handed back when the cache can wait for a publish."""
        if session.state is SessionState.CLOSED:
            await self.cache.drop(session.tenant_id, str(session.id))
            return None
        remaining = int((session.expires_at - now).total_seconds())
        if remaining <= 0:
            return None
        if later:
            return await self.cache.put_later(session, remaining)
        await self.cache.put(session, remaining)
        return None

    @asynccontextmanager
    async def _audited(
        self,
        uow: UnitOfWork,
        principal: Principal,
        action: str,
        session_id: uuid.UUID | None,
    ) -> AsyncIterator[None]:
        try:
            yield
        except ServiceError as error:
            await uow.rollback()  # free the connection before the audit's own
            await audit.record_failure(
                uow.factory,
                principal,
                action,
                "session",
                str(session_id) if session_id else None,
                error.code,
            )
            raise


def _not_found(session_id: uuid.UUID) -> NotFound:
    return NotFound("session not found", details={"session_id": str(session_id)})
