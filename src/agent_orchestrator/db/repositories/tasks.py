"""Every query on tasks and service calls.

Each method takes the tenant and filters by it, except the few marked *system sweep*: the
reconciler looks across tenants by design (it repairs the ledger, it serves no caller).
Status writes are conditional updates whose WHERE clause names the allowed source states;
only `services.task_ledger` calls them. The statements every task runs are built once
(see `rows.py`); a transition's statement is built once per shape (sources, columns set,
guard) and kept.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from agent_orchestrator.db.prepared import Bound, fixed_in, hot
from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.tables import BatchRow, ServiceCallRow, TaskRow

TASKS = RowCodec(TaskRow)
CALLS = RowCodec(ServiceCallRow)
_T = TASKS.columns
_C = CALLS.columns


@dataclass(frozen=True)
class Add:
    """A transition value computed from the column itself: `attempt = attempt + 1`."""

    amount: int


@dataclass(frozen=True)
class Guard:
    """Conditions a transition adds to its source states. Data rather than expressions,
    so that the statement of each combination is built once; a field left None (or False)
    adds nothing."""

    lease_owner: str | None = None
    #: the attempt the caller runs: a worker's earlier attempt of a task that was taken
    #: from it and claimed again (by the same worker id, even) must not write
    attempt: int | None = None
    #: cancel has not been requested
    not_cancelled: bool = False
    #: due by this moment (no `not_before`, or one at or before it)
    due_at: datetime | None = None
    #: the session's earlier turns are done (see `_session_turn_is_free`)
    turn_free: bool = False
    #: the task's batch runs fewer items than it may (see `batch_has_a_slot`)
    batch_slot: bool = False
    lease_expired_before: datetime | None = None
    #: still the delivery the caller saw (nobody re-delivered it meanwhile)
    delivery: int | None = None

    def shape(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    def params(self) -> dict[str, Any]:
        return {f"g_{name}": getattr(self, name) for name in self.shape()}


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


def batch_has_a_slot() -> ColumnElement[bool]:
    """Claim condition: a batch runs at most its `max_parallel` items at once, oldest
    first. True when the task has no batch, or fewer than that many of its batch's other
    items are running or queued before it. Concurrent claims cannot overshoot: a task
    that becomes claimable counts every item that could run before it, running or not."""
    other = aliased(TaskRow)
    ahead = (
        select(func.count())
        .select_from(other)
        .where(
            other.batch_id == TaskRow.batch_id,
            other.id != TaskRow.id,
            or_(
                other.status == "running",
                and_(other.status == "queued", other.id < TaskRow.id),
            ),
        )
        .scalar_subquery()
    )
    allowed = select(BatchRow.max_parallel).where(BatchRow.id == TaskRow.batch_id).scalar_subquery()
    return or_(TaskRow.batch_id.is_(None), ahead < allowed)


def _guard_condition(name: str) -> ColumnElement[bool]:
    if name == "turn_free":
        return _session_turn_is_free()
    if name == "batch_slot":
        return batch_has_a_slot()
    if name == "not_cancelled":
        return _T.cancel_requested.is_(False)
    if name == "due_at":
        due = bindparam("g_due_at", type_=_T.not_before.type)
        return or_(_T.not_before.is_(None), _T.not_before <= due)
    if name == "lease_expired_before":
        return _T.lease_expires_at < bindparam(
            "g_lease_expired_before", type_=_T.lease_expires_at.type
        )
    column = _T[name]
    return column == bindparam(f"g_{name}", type_=column.type)


_Shape = tuple[tuple[str, ...], tuple[tuple[str, int | None], ...], tuple[str, ...]]
_transitions: dict[_Shape, Update] = {}


def _transition_statement(shape: _Shape) -> Update:
    statement = _transitions.get(shape)
    if statement is None:
        sources, columns, guard = shape
        status = _T.status
        statement = (
            update(TASKS.table)
            .where(
                _T.tenant_id == bindparam("w_tenant_id"),
                _T.id == bindparam("w_id"),
                status == sources[0] if len(sources) == 1 else fixed_in(status, sources),
                *(_guard_condition(name) for name in guard),
            )
            .values(
                {
                    name: _T[name] + amount
                    if amount is not None
                    else bindparam(f"v_{name}", type_=_T[name].type)
                    for name, amount in columns
                }
            )
            .returning(*_T)
        )
        statement = hot(statement)
        _transitions[shape] = statement
    return statement


def _by_tenant(*conditions: ColumnElement[bool]) -> tuple[ColumnElement[bool], ...]:
    return (_T.tenant_id == bindparam("tenant_id"), *conditions)


_GET = hot(select(TASKS.table).where(*_by_tenant(_T.id == bindparam("task_id"))))
_BY_IDEMPOTENCY_KEY = hot(
    select(TASKS.table).where(*_by_tenant(_T.idempotency_key == bindparam("key")))
)
_UNFINISHED_IN_SESSION = (
    select(TASKS.table)
    .where(
        *_by_tenant(_T.session_id == bindparam("session_id"), _T.status.in_(["queued", "running"]))
    )
    .order_by(_T.created_at)
)
_NEXT_IN_SESSION = hot(
    select(TASKS.table)
    .where(*_by_tenant(_T.session_id == bindparam("session_id"), _T.status == "queued"))
    .order_by(_T.id)
    .limit(1)
)
_EXPIRED_LEASES = (
    select(TASKS.table)
    .where(
        _T.status == "running",
        _T.lease_expires_at < bindparam("now", type_=_T.lease_expires_at.type),
    )
    .order_by(_T.lease_expires_at)
    .limit(bindparam("limit"))
)
_MOMENT = bindparam("moment", type_=_T.updated_at.type)
_QUEUED_BEFORE = (
    select(TASKS.table)
    .where(
        _T.status == "queued",
        _T.updated_at < _MOMENT,
        or_(_T.not_before.is_(None), _T.not_before < _MOMENT),
        # A batch's items wait for slots; the batches' own sweep delivers them (batches.py).
        _T.batch_id.is_(None),
    )
    .order_by(_T.updated_at)
    .limit(bindparam("limit"))
)
_IN_BATCH = (_T.tenant_id == bindparam("tenant_id"), _T.batch_id == bindparam("batch_id"))
_RUNNING_IN_BATCH = select(func.count()).where(*_IN_BATCH, _T.status == "running")
_FIRST_QUEUED_IN_BATCH = (
    select(TASKS.table)
    .where(*_IN_BATCH, _T.status == "queued")
    .order_by(_T.id)
    .limit(bindparam("limit"))
)
_SERVICE_CALLS = hot(
    select(CALLS.table)
    .where(_C.tenant_id == bindparam("tenant_id"), _C.task_id == bindparam("task_id"))
    .order_by(_C.started_at, _C.step)
)


def upsert_set(statement: Any) -> dict[str, Any]:
    """What a service call's upsert overwrites: all but its identity (the row's id, its
    task, tenant and step)."""
    kept = {"id", "task_id", "tenant_id", "step"}
    return {c.name: statement.excluded[c.name] for c in _C if c.name not in kept}


def _upsert_calls(insert: Any) -> Any:
    """INSERT ... ON CONFLICT (task_id, step) DO UPDATE: one row per step of a task, the
    latest attempt's, written in one statement however many attempts ran."""
    statement = insert(CALLS.table)
    return statement.on_conflict_do_update(
        index_elements=[_C.task_id, _C.step], set_=upsert_set(statement)
    )


_UPSERT_CALLS: dict[str, Insert] = {
    "postgresql": hot(_upsert_calls(pg_insert)),
    "sqlite": hot(_upsert_calls(sqlite_insert)),
}


def transition_call(
    tenant_id: str,
    task_id: uuid.UUID,
    sources: list[str],
    values: dict[str, Any],
    guard: Guard = Guard(),
) -> Bound:
    """`TaskRepository.transition`'s UPDATE ... RETURNING and its parameters, for a
    caller that sends it with other statements (turn_end.py)."""
    columns = tuple(
        (name, value.amount if isinstance(value, Add) else None)
        for name, value in sorted(values.items())
    )
    statement = _transition_statement((tuple(sources), columns, guard.shape()))
    params = {f"v_{name}": value for name, value in values.items() if not isinstance(value, Add)}
    params.update(guard.params(), w_tenant_id=tenant_id, w_id=task_id)
    return statement, params


class TaskRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def add(self, row: TaskRow) -> TaskRow:
        await TASKS.add(self.db, row)
        return row

    async def get(self, tenant_id: str, task_id: uuid.UUID) -> TaskRow | None:
        return await TASKS.one(self.db, _GET, {"tenant_id": tenant_id, "task_id": task_id})

    async def by_idempotency_key(self, tenant_id: str, key: str) -> TaskRow | None:
        return await TASKS.one(self.db, _BY_IDEMPOTENCY_KEY, {"tenant_id": tenant_id, "key": key})

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
        guard: Guard = Guard(),
    ) -> TaskRow | None:
        """Move one task if it is in one of `sources` (and `guard` holds): exactly one
        concurrent caller can win. Returns the updated row (detached), or None when it
        lost. `values` maps columns to values, or to `Add` for a column's own value plus
        an amount."""
        return await TASKS.one(
            self.db, *transition_call(tenant_id, task_id, sources, values, guard)
        )

    async def cancel_batch(
        self, tenant_id: str, batch_id: uuid.UUID, now: datetime
    ) -> list[TaskRow]:
        """A batch's unfinished items in one statement: the queued ones end `cancelled`,
        the running ones are flagged. One statement, because each row is then decided on
        its latest version: as two, an item a worker put back in the queue between them
        (a retry) was neither cancelled nor flagged, and ran after the batch's cancel."""
        queued = _T.status == "queued"
        at = bindparam("now", now, type_=_T.finished_at.type)
        statement = (
            update(TASKS.table)
            .where(
                _T.tenant_id == tenant_id,
                _T.batch_id == batch_id,
                fixed_in(_T.status, ["queued", "running"]),
            )
            .values(
                status=case((queued, "cancelled"), else_=_T.status),
                finished_at=case((queued, at), else_=_T.finished_at),
                cancel_requested=case((queued, _T.cancel_requested), else_=True),
                updated_at=at,
            )
            .returning(*_T)
        )
        return await TASKS.all(self.db, statement, {})

    async def unfinished_in_session(self, tenant_id: str, session_id: uuid.UUID) -> list[TaskRow]:
        params = {"tenant_id": tenant_id, "session_id": session_id}
        return await TASKS.all(self.db, _UNFINISHED_IN_SESSION, params)

    async def next_in_session(self, tenant_id: str, session_id: uuid.UUID) -> TaskRow | None:
        """The session's oldest queued task: the turn that may run next."""
        params = {"tenant_id": tenant_id, "session_id": session_id}
        return await TASKS.one(self.db, _NEXT_IN_SESSION, params)

    async def ready_in_batch(
        self, tenant_id: str, batch_id: uuid.UUID, max_parallel: int
    ) -> list[TaskRow]:
        """The batch's queued items that may start now, oldest first: as many of the
        oldest as there are free slots, the items `batch_has_a_slot` admits (asked of each
        queued item, that condition would cost a count per item, so this reads the two
        numbers it rests on instead)."""
        params: dict[str, Any] = {"tenant_id": tenant_id, "batch_id": batch_id}
        running = (await self.db.execute(_RUNNING_IN_BATCH, params)).scalar_one()
        free = max_parallel - running
        if free <= 0:
            return []
        return await TASKS.all(self.db, _FIRST_QUEUED_IN_BATCH, {**params, "limit": free})

    async def expired_leases(self, now: datetime, limit: int) -> list[TaskRow]:
        """*System sweep*: running tasks whose worker stopped renewing its lease."""
        return await TASKS.all(self.db, _EXPIRED_LEASES, {"now": now, "limit": limit})

    async def queued_before(self, moment: datetime, limit: int) -> list[TaskRow]:
        """*System sweep*: tasks queued (and due) since before `moment`."""
        return await TASKS.all(self.db, _QUEUED_BEFORE, {"moment": moment, "limit": limit})

    # --- service calls ------------------------------------------------------------------
    async def service_calls(self, tenant_id: str, task_id: uuid.UUID) -> list[ServiceCallRow]:
        params = {"tenant_id": tenant_id, "task_id": task_id}
        return await CALLS.all(self.db, _SERVICE_CALLS, params)

    async def replace_service_calls(
        self, tenant_id: str, task_id: uuid.UUID, rows: list[ServiceCallRow]
    ) -> None:
        """One row per (task, step): a retried task's steps replace those it ran before."""
        if rows:
            statement = _UPSERT_CALLS[self.db.get_bind().dialect.name]
            await self.db.execute(statement, [CALLS.values(row) for row in rows])
