"""Every query on batches and on a batch's items (tasks with its `batch_id`).

Each method takes the tenant and filters by it, except the one marked *system sweep*.
A batch's status is written by conditional updates only: `running` until every item has
ended, then `completed` (or `cancelled`, when a cancel was asked) exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, bindparam, case, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from agent_orchestrator.db.repositories.paging import keyset_page, split_page
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.repositories.tasks import TASKS
from agent_orchestrator.db.tables import BatchRow, TaskRow

BATCHES = RowCodec(BatchRow)
_B = BATCHES.columns
_T = TASKS.columns

#: The kind of a batch's item tasks.
BATCH_ITEM_KIND = "batch_item"

_GET = select(BATCHES.table).where(
    _B.tenant_id == bindparam("tenant_id"), _B.id == bindparam("batch_id")
)
_GET_FOR_UPDATE = _GET.with_for_update()
_BY_IDEMPOTENCY_KEY = select(BATCHES.table).where(
    _B.tenant_id == bindparam("tenant_id"), _B.idempotency_key == bindparam("key")
)
#: By batch id alone: ix_tasks_batch (batch_id, status, id) then answers without reading
#: a row. Only items carry a batch id (the webhook task names its batch in its input).
_COUNTS = (
    select(_T.batch_id, _T.status, func.count())
    .where(_T.batch_id.in_(bindparam("batch_ids", expanding=True)))
    .group_by(_T.batch_id, _T.status)
)
_unfinished_item = exists().where(
    _T.batch_id == _B.id, _T.kind == BATCH_ITEM_KIND, _T.status.in_(["queued", "running"])
)
#: The one batch an UPDATE below names, while it runs.
_RUNNING_BATCH = (
    _B.tenant_id == bindparam("w_tenant_id"),
    _B.id == bindparam("w_batch_id"),
    _B.status == "running",
)
_FINISH = (
    update(BATCHES.table)
    .where(*_RUNNING_BATCH, ~_unfinished_item)
    .values(
        status=case((_B.cancel_requested.is_(True), "cancelled"), else_="completed"),
        finished_at=bindparam("v_now", type_=_B.finished_at.type),
        updated_at=bindparam("v_now", type_=_B.updated_at.type),
    )
    .returning(*_B)
)
_REQUEST_CANCEL = (
    update(BATCHES.table)
    .where(*_RUNNING_BATCH)
    .values(cancel_requested=True, updated_at=bindparam("v_now", type_=_B.updated_at.type))
    .returning(*_B)
)
_running = aliased(TaskRow)
_running_items = (
    select(func.count())
    .select_from(_running)
    .where(_running.batch_id == _B.id, _running.status == "running")
    .scalar_subquery()
)
#: Batches with an item waiting since `moment` and a free slot, longest waiting first. A
#: batch that is merely full waits for a slot, not for the sweep: returned, it took the
#: place of one whose hand-over was lost, round after round.
_WAITING_SINCE = (
    select(_T.tenant_id, _T.batch_id, _B.max_parallel)
    .join_from(TASKS.table, BATCHES.table, _B.id == _T.batch_id)
    .where(
        _T.status == "queued",
        _T.kind == BATCH_ITEM_KIND,
        _T.updated_at < bindparam("moment", type_=_T.updated_at.type),
        _B.status == "running",
        _running_items < _B.max_parallel,
    )
    .group_by(_T.tenant_id, _T.batch_id, _B.max_parallel)
    .order_by(func.min(_T.updated_at))
    .limit(bindparam("limit"))
)
_DONE_BUT_RUNNING = (
    select(_B.tenant_id, _B.id)
    .where(_B.status == "running", ~_unfinished_item)
    .limit(bindparam("limit"))
)


class BatchRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def get(
        self, tenant_id: str, batch_id: uuid.UUID, *, for_update: bool = False
    ) -> BatchRow | None:
        statement = _GET_FOR_UPDATE if for_update else _GET
        return await BATCHES.one(self.db, statement, {"tenant_id": tenant_id, "batch_id": batch_id})

    async def by_idempotency_key(self, tenant_id: str, key: str) -> BatchRow | None:
        params = {"tenant_id": tenant_id, "key": key}
        return await BATCHES.one(self.db, _BY_IDEMPOTENCY_KEY, params)

    async def page(
        self, tenant_id: str, *, user_id: str | None, limit: int, cursor: str | None
    ) -> tuple[list[BatchRow], str | None]:
        query = select(BatchRow).where(BatchRow.tenant_id == tenant_id)
        if user_id is not None:
            query = query.where(BatchRow.user_id == user_id)
        query = keyset_page(query, BatchRow.created_at, BatchRow.id, limit=limit, cursor=cursor)
        rows = list((await self.db.execute(query)).scalars())
        return split_page(rows, limit, lambda row: (row.created_at, row.id))

    async def counts(self, batches: Sequence[BatchRow]) -> dict[uuid.UUID, dict[str, int]]:
        """Items by status, per batch: read from the ledger, one query for all. Takes
        batch rows, which their caller read for a tenant, rather than bare ids: a
        batch's id then stands for its tenant, and the count reads only the index (it
        runs after every item's end)."""
        found: dict[uuid.UUID, dict[str, int]] = {batch.id: {} for batch in batches}
        if batches:
            params = {"batch_ids": list(found)}
            for batch_id, status, count in await self.db.execute(_COUNTS, params):
                found[batch_id][status] = count
        return found

    async def items(
        self,
        tenant_id: str,
        batch_id: uuid.UUID,
        *,
        status: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[TaskRow], str | None]:
        """A page of the batch's items in the order they were given."""
        query = select(TaskRow).where(
            and_(
                TaskRow.tenant_id == tenant_id,
                TaskRow.batch_id == batch_id,
                TaskRow.kind == BATCH_ITEM_KIND,
            )
        )
        if status is not None:
            query = query.where(TaskRow.status == status)
        query = keyset_page(
            query, TaskRow.created_at, TaskRow.id, limit=limit, cursor=cursor, newest_first=False
        )
        rows = list((await self.db.execute(query)).scalars())
        return split_page(rows, limit, lambda row: (row.created_at, row.id))

    async def request_cancel(
        self, tenant_id: str, batch_id: uuid.UUID, now: datetime
    ) -> BatchRow | None:
        """Flag a running batch; None when it has already ended."""
        params = {"w_tenant_id": tenant_id, "w_batch_id": batch_id, "v_now": now}
        return await BATCHES.one(self.db, _REQUEST_CANCEL, params)

    async def finish_if_done(
        self, tenant_id: str, batch_id: uuid.UUID, now: datetime
    ) -> BatchRow | None:
        """`completed` (or `cancelled`) once no item is queued or running: exactly one
        caller gets the row back, however many ask at once."""
        params = {"w_tenant_id": tenant_id, "w_batch_id": batch_id, "v_now": now}
        return await BATCHES.one(self.db, _FINISH, params)

    async def waiting_since(self, moment: datetime, limit: int) -> list[tuple[str, uuid.UUID, int]]:
        """*System sweep*: running batches with a free slot and items queued since before
        `moment`, longest waiting first, and how many items each may run at once."""
        result = await self.db.execute(_WAITING_SINCE, {"moment": moment, "limit": limit})
        return [(tenant_id, batch_id, most) for tenant_id, batch_id, most in result]

    async def done_but_running(self, limit: int) -> list[tuple[str, uuid.UUID]]:
        """*System sweep*: batches whose items have all ended but whose end was not
        written (the process that ended the last item stopped before it could)."""
        result = await self.db.execute(_DONE_BUT_RUNNING, {"limit": limit})
        return [(tenant_id, batch_id) for tenant_id, batch_id in result]
