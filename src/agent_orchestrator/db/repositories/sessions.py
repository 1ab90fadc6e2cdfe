"""Every query on sessions. Each method takes the tenant and filters by it. The statements
each chat turn runs are built once (see `rows.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Update, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.prepared import Bound, fixed_in, hot
from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.tables import SessionRow

SESSIONS = RowCodec(SessionRow)
_S = SESSIONS.columns

#: A session's transition to make at some moment: (tenant_id, session_id, now) -> its
#: statement (a `transition_call`), for a caller that decides when and with what it runs.
SessionMove = Callable[[str, uuid.UUID, datetime], Bound]

_GET = hot(
    select(SESSIONS.table).where(
        _S.tenant_id == bindparam("tenant_id"), _S.id == bindparam("session_id")
    )
)
_GET_FOR_UPDATE = _GET.with_for_update()

_updates: dict[tuple[tuple[str, ...], tuple[str, ...]], Update] = {}


def _update_statement(sources: tuple[str, ...], columns: tuple[str, ...]) -> Update:
    """UPDATE ... RETURNING of one session, built once per (source states, columns set);
    no source states means any state and any expiry."""
    key = (sources, columns)
    statement = _updates.get(key)
    if statement is None:
        conditions = [_S.tenant_id == bindparam("w_tenant_id"), _S.id == bindparam("w_id")]
        if sources:
            conditions += [
                fixed_in(_S.state, sources),
                _S.expires_at > bindparam("w_live_at", type_=_S.expires_at.type),
            ]
        statement = (
            update(SESSIONS.table)
            .where(*conditions)
            .values({name: bindparam(f"v_{name}", type_=_S[name].type) for name in columns})
            .returning(*_S)
        )
        statement = hot(statement)
        _updates[key] = statement
    return statement


class SessionRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, row: SessionRow) -> SessionRow:
        await SESSIONS.add(self.db, row)
        return row

    async def get(
        self, tenant_id: str, session_id: uuid.UUID, *, for_update: bool = False
    ) -> SessionRow | None:
        statement = _GET_FOR_UPDATE if for_update else _GET
        params = {"tenant_id": tenant_id, "session_id": session_id}
        return await SESSIONS.one(self.db, statement, params)

    async def page(
        self,
        tenant_id: str,
        *,
        user_id: str | None,
        states: list[str] | None,
        expired_before: datetime | None,
        live_after: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[SessionRow], str | None]:
        """`states` filters stored states; `expired_before` / `live_after` split the live
        states by expiry so that the `expired` filter (derived, not stored) pages right."""
        query = select(SessionRow).where(SessionRow.tenant_id == tenant_id)
        if user_id is not None:
            query = query.where(SessionRow.user_id == user_id)
        if states is not None:
            query = query.where(SessionRow.state.in_(states))
        if expired_before is not None:
            query = query.where(SessionRow.expires_at <= expired_before)
        if live_after is not None:
            query = query.where(SessionRow.expires_at > live_after)
        query = keyset_page(query, SessionRow.created_at, SessionRow.id, limit=limit, cursor=cursor)
        rows = list((await self.db.execute(query)).scalars())
        return split_page(rows, limit, lambda row: (row.created_at, row.id))

    async def update(self, row: SessionRow, **values: Any) -> SessionRow:
        """Write `values` (attribute names) to a session the caller loaded, and to `row`."""
        await SESSIONS.one(self.db, *_update_call(row.tenant_id, row.id, (), values, None))
        for name, value in values.items():
            setattr(row, name, value)
        return row


def transition_call(
    tenant_id: str,
    session_id: uuid.UUID,
    sources: list[str],
    live_at: datetime,
    values: dict[str, Any],
) -> Bound:
    """UPDATE ... RETURNING of a session that is in one of `sources` and not expired at
    `live_at`, with its parameters: run it with `SESSIONS.one`, or send it with other
    statements (turn_end.py)."""
    return _update_call(tenant_id, session_id, tuple(sources), values, live_at)


def _update_call(
    tenant_id: str,
    session_id: uuid.UUID,
    sources: tuple[str, ...],
    values: dict[str, Any],
    live_at: datetime | None,
) -> Bound:
    changes = SESSIONS.column_values(values)
    statement = _update_statement(sources, tuple(sorted(changes)))
    params = {f"v_{name}": value for name, value in changes.items()}
    params.update(w_tenant_id=tenant_id, w_id=session_id)
    if sources:
        params["w_live_at"] = live_at
    return statement, params
