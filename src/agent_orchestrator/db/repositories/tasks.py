"""Every query on tasks and service calls.

Each method takes the tenant and filters by it, except the few marked *system sweep*: the
reconciler looks across tenants by design (it repairs the ledger, it serves no caller).
Status writes are conditional updates whose WHERE clause names the allowed source states;
only `services.task_ledger` calls them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.tables import ServiceCallRow, TaskRow

_CALL_COLUMNS = tuple(ServiceCallRow.__table__.columns)
_TASKS: Table = TaskRow.__table__  # type: ignore[assignment]


class TaskRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, row: TaskRow) -> TaskRow:
        self.db.add(row)
        await self.db.flush()
        return row

    async def get(self, tenant_id: str, task_id: uuid.UUID) -> TaskRow | None:
        query = select(TaskRow).where(TaskRow.tenant_id == tenant_id, TaskRow.id == task_id)
        return (await self.db.execute(query)).scalar_one_or_none()

    async def by_idempotency_key(self, tenant_id: str, key: str) -> TaskRow | None:
        query = select(TaskRow).where(
            TaskRow.tenant_id == tenant_id, TaskRow.idempotency_key == key
        )
        return (await self.db.execute(query)).scalar_one_or_none()

    async def page(
        self,
        tenant_id: str,
        *,
        user_id: str | None,
        session_id: uuid.UUID | None,
        status: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[TaskRow], str | None]:
        query = select(TaskRow).where(TaskRow.tenant_id == tenant_id)
        if user_id is not None:
            query = query.where(TaskRow.user_id == user_id)
        if session_id is not None:
            query = query.where(TaskRow.session_id == session_id)
        if status is not None:
            query = query.where(TaskRow.status == status)
        query = keyset_page(query, TaskRow.created_at, TaskRow.id, limit=limit, cursor=cursor)
        rows = list((await self.db.execute(query)).scalars())
        return split_page(rows, limit, lambda row: (row.created_at, row.id))

    async def transition(
        self,
        tenant_id: str,
        task_id: uuid.UUID,
        *,
        sources: list[str],
        values: dict[str, Any],
        conditions: tuple[ColumnElement[bool], ...] = (),
    ) -> TaskRow | None:
        """Move one task if it is in one of `sources` (and `conditions` hold): exactly one
        concurrent caller can win. Returns the updated row, or None when it lost."""
        # A Core UPDATE on the table, its row rebuilt as a detached TaskRow: the ORM's
        # bulk-update path was a sixth of a worker's busy time (claim and finish of every
        # task). Detached also means a row the session already holds is never handed back
        # with its values from before the update.
        status = _TASKS.c.status
        statement = (
            update(_TASKS)
            .where(
                _TASKS.c.tenant_id == tenant_id,
                _TASKS.c.id == task_id,
                status == sources[0] if len(sources) == 1 else status.in_(sources),
                *conditions,
            )
            .values(**values)
            .returning(*_TASKS.c)
        )
        row = (await self.db.execute(statement)).mappings().one_or_none()
        return None if row is None else TaskRow(**row)

    async def unfinished_in_session(self, tenant_id: str, session_id: uuid.UUID) -> list[TaskRow]:
        query = (
            select(TaskRow)
            .where(
                TaskRow.tenant_id == tenant_id,
                TaskRow.session_id == session_id,
                TaskRow.status.in_(["queued", "running"]),
            )
            .order_by(TaskRow.created_at)
        )
        return list((await self.db.execute(query)).scalars())

    async def next_in_session(self, tenant_id: str, session_id: uuid.UUID) -> TaskRow | None:
        """The session's oldest queued task: the turn that may run next."""
        query = (
            select(TaskRow)
            .where(
                TaskRow.tenant_id == tenant_id,
                TaskRow.session_id == session_id,
                TaskRow.status == "queued",
            )
            .order_by(TaskRow.id)
            .limit(1)
        )
        return (await self.db.execute(query)).scalar_one_or_none()

    async def expired_leases(self, now: datetime, limit: int) -> list[TaskRow]:
        """*System sweep*: running tasks whose worker stopped renewing its lease."""
        query = (
            select(TaskRow)
            .where(TaskRow.status == "running", TaskRow.lease_expires_at < now)
            .order_by(TaskRow.lease_expires_at)
            .limit(limit)
        )
        return list((await self.db.execute(query)).scalars())

    async def queued_before(self, moment: datetime, limit: int) -> list[TaskRow]:
        """*System sweep*: tasks queued (and due) since before `moment`."""
        query = (
            select(TaskRow)
            .where(
                TaskRow.status == "queued",
                TaskRow.updated_at < moment,
                (TaskRow.not_before.is_(None)) | (TaskRow.not_before < moment),
            )
            .order_by(TaskRow.updated_at)
            .limit(limit)
        )
        return list((await self.db.execute(query)).scalars())

    # --- service calls ------------------------------------------------------------------
    async def service_calls(self, tenant_id: str, task_id: uuid.UUID) -> list[ServiceCallRow]:
        query = (
            select(ServiceCallRow)
            .where(ServiceCallRow.tenant_id == tenant_id, ServiceCallRow.task_id == task_id)
            .order_by(ServiceCallRow.started_at, ServiceCallRow.step)
        )
        return list((await self.db.execute(query)).scalars())

    async def replace_service_calls(
        self, tenant_id: str, task_id: uuid.UUID, rows: list[ServiceCallRow]
    ) -> None:
        """One row per (task, step): a retried task's steps replace those it ran before."""
        steps = [row.step for row in rows]
        if not steps:
            return
        await self.db.execute(
            delete(ServiceCallRow).where(
                ServiceCallRow.tenant_id == tenant_id,
                ServiceCallRow.task_id == task_id,
                ServiceCallRow.step.in_(steps),
            )
        )
        await self.db.execute(
            insert(ServiceCallRow),
            [{column.key: getattr(row, column.key) for column in _CALL_COLUMNS} for row in rows],
        )


def _session_turn_is_free() -> ColumnElement[bool]:
    """Claim condition: a session's tasks run one at a time, oldest first. True when the
    task has no session, or no other task of its session is running or queued before it."""
    other = aliased(TaskRow)
    earlier_or_running = exists().where(
        other.tenant_id == TaskRow.tenant_id,
        other.session_id == TaskRow.session_id,
        other.id != TaskRow.id,
        or_(
            other.status == "running",
            # ids are time-ordered (ids.new_id), so a smaller id was submitted earlier
            and_(other.status == "queued", other.id < TaskRow.id),
        ),
    )
    return or_(TaskRow.session_id.is_(None), ~earlier_or_running)


#: Built once: the expression has no parameters, and building it costs more than the query.
SESSION_TURN_IS_FREE = _session_turn_is_free()
