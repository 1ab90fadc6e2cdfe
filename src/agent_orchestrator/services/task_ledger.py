"""The task ledger: the only module that changes a task's status.

Every write is a conditional update whose source states come from `models.task.TRANSITIONS`,
so an illegal move cannot happen and concurrent claimants cannot both win. Each state
change publishes a `task.status` event after its transaction commits (a batch's new
items excepted: the batch's progress announces them); work that must follow a commit
(enqueueing a delivery) runs then too, never before. The writes' statements and values are
built in task_writes.py; how a row is shown, as a view or an event, is in task_views.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.db.driver_session import DriverSession
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.prepared import Bound
from agent_orchestrator.db.repositories.sessions import SESSIONS, SessionMove
from agent_orchestrator.db.repositories.task_session import move_together
from agent_orchestrator.db.repositories.tasks import (
    TASKS,
    Add,
    Guard,
    TaskRepository,
)
from agent_orchestrator.db.tables import ServiceCallRow, SessionRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import Conflict, NotFound
from agent_orchestrator.events.bus import EventBus
from agent_orchestrator.events.models import Event
from agent_orchestrator.ids import new_id
from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.models.task import (
    TERMINAL,
    TaskErrorInfo,
    TaskStatus,
    TaskView,
)
from agent_orchestrator.observability import audit
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.queue.producer import TaskProducer
from agent_orchestrator.services.session_manager import may_see, sees_whole_tenant
from agent_orchestrator.services.task_views import status_event, to_view
from agent_orchestrator.services.task_writes import (
    count_finished,
    held_by,
    owned_write,
    seconds_until,
    status_write,
    terminal_values,
    unleased,
)

log = get_logger(__name__)


#: Called with a task that ended outside a worker's attempt (`on_ended_elsewhere`).
EndHook = Callable[[TaskRow], Awaitable[None]]


class Renewal(StrEnum):
    ALIVE = "alive"
    CANCEL = "cancel"
    LOST = "lost"


@dataclass(frozen=True)
class Claim:
    task: TaskRow
    #: the task's session as the claim moved it (None: not asked, or it did not move)
    session: SessionRow | None
    #: the claim's `now`
    at: datetime


@dataclass(frozen=True)
class Submission:
    kind: str
    queue: str
    input: dict[str, Any]
    session_id: uuid.UUID | None = None
    batch_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    max_attempts: int | None = None


def _not_found(task_id: uuid.UUID) -> NotFound:
    return NotFound("task not found", details={"task_id": str(task_id)})


class TaskLedger:
    def __init__(
        self,
        factory: async_sessionmaker[AsyncSession],
        bus: EventBus,
        producer: TaskProducer,
        *,
        default_max_attempts: int,
        lease_ttl: float,
    ) -> None:
        # Every session the ledger opens itself runs one statement, so this may be (and
        # in the service is) an autocommit factory: db.engine.single_statement_factory.
        self.factory = factory
        self.bus = bus
        self.producer = producer
        self.default_max_attempts = default_max_attempts
        self.lease = timedelta(seconds=lease_ttl)
        self._end_hooks: list[EndHook] = []

    # --- API side: runs in the request's unit of work ------------------------------------
    async def submit(
        self, uow: UnitOfWork, principal: Principal, submission: Submission
    ) -> tuple[TaskRow, bool]:
        """Write a `queued` task; enqueue and announce it after commit. With an
        idempotency key already used by this tenant, return that task (created=False)."""
        repo = TaskRepository(uow.session)
        key = submission.idempotency_key
        if key is not None:
            existing = await repo.by_idempotency_key(principal.tenant_id, key)
            if existing is not None:
                return existing, False
        row = self._new_row(principal, submission)
        if key is None:
            uow.insert_at_commit(TASKS, row)  # nothing reads it back before the commit
        else:
            # Another request with the same key may win the race: answer with its task.
            winner = await uow.insert_unless_raced(
                TASKS, row, lambda: repo.by_idempotency_key(principal.tenant_id, key)
            )
            if winner is not None:
                return winner, False
        audit.record(uow, principal, "task.submit", "task", str(row.id), {"kind": row.kind})

        async def announce_and_enqueue() -> None:
            # Announce first: the `queued` event must get a smaller id than the `running`
            # event the worker publishes once it has the delivery.
            await self.bus.publish(status_event(row))
            await self.producer.deliver(row)

        uow.after_commit(announce_and_enqueue)
        return row, True

    def _new_row(self, principal: Principal, submission: Submission) -> TaskRow:
        now = utcnow()
        return TASKS.new(
            id=new_id(),
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            session_id=submission.session_id,
            batch_id=submission.batch_id,
            kind=submission.kind,
            queue=submission.queue,
            status=TaskStatus.QUEUED.value,
            attempt=0,
            max_attempts=submission.max_attempts or self.default_max_attempts,
            delivery=1,
            progress={},
            input=submission.input,
            result=None,
            error=None,
            idempotency_key=submission.idempotency_key,
            cancel_requested=False,
            lease_owner=None,
            lease_expires_at=None,
            not_before=None,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
        )

    def add_batch_item(
        self, uow: UnitOfWork, principal: Principal, submission: Submission
    ) -> TaskRow:
        """A `queued` item of a batch, written with the unit of work and neither announced
        nor delivered: the batch delivers its items as its slots free
        (`deliver_ready_in_batch`), so items waiting their turn cost no queue traffic."""
        row = self._new_row(principal, submission)
        uow.insert_at_commit(TASKS, row)
        return row

    async def deliver_ready_in_batch(
        self, tenant_id: str, batch_id: uuid.UUID, max_parallel: int
    ) -> int:
        """Deliver the batch's items that may start now and have no delivery waiting."""
        async with self.factory() as db:
            ready = await TaskRepository(db).ready_in_batch(tenant_id, batch_id, max_parallel)
        delivered = 0
        for row in ready:
            if not await self.producer.is_pending(row):
                delivered += await self._redeliver(row)
        return delivered

    async def cancel_batch_items(
        self, uow: UnitOfWork, tenant_id: str, batch_id: uuid.UUID
    ) -> list[TaskRow]:
        """A batch's queued items end `cancelled` at once; its running ones are flagged and
        their workers told, as `request_cancel` does for one task. Returns the items
        cancelled now; their events go out after the commit."""
        rows = await TaskRepository(uow.session).cancel_batch(tenant_id, batch_id, utcnow())
        cancelled = [row for row in rows if row.status == TaskStatus.CANCELLED]
        flagged = [row for row in rows if row.status == TaskStatus.RUNNING]

        async def notify() -> None:
            for row in cancelled:
                count_finished(row)
            if cancelled:
                await self.bus.publish_many([status_event(row) for row in cancelled])
            for row in flagged:
                await self.bus.publish_control({"action": "cancel", "task_id": str(row.id)})

        uow.after_commit(notify)
        return cancelled

    async def view(self, uow: UnitOfWork, principal: Principal, task_id: uuid.UUID) -> TaskView:
        row = await self.load_visible(uow.session, principal, task_id)
        calls = await TaskRepository(uow.session).service_calls(principal.tenant_id, task_id)
        return to_view(row, calls)

    async def load_visible(
        self, db: AsyncSession, principal: Principal, task_id: uuid.UUID
    ) -> TaskRow:
        row = await TaskRepository(db).get(principal.tenant_id, task_id)
        if row is None or not may_see(principal, row.user_id):
            raise _not_found(task_id)
        return row

    async def page(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        session_id: uuid.UUID | None,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
    ) -> Page[TaskView]:
        rows, next_cursor = await TaskRepository(uow.session).page(
            principal.tenant_id,
            user_id=None if sees_whole_tenant(principal) else principal.user_id,
            session_id=session_id,
            status=status.value if status else None,
            limit=limit,
            cursor=cursor,
        )
        return Page(items=[to_view(row) for row in rows], next_cursor=next_cursor)

    async def request_cancel(
        self,
        uow: UnitOfWork,
        principal: Principal,
        task_id: uuid.UUID,
        *,
        kind: str | None = None,
    ) -> TaskRow:
        """Queued: cancelled at once. Running: flagged, and the worker holding it is told
        (it also sees the flag on its next lease renewal). Finished: 409. With `kind`, a
        task of another kind is not found (the chat API cancels chat turns only)."""
        row = await self.load_visible(uow.session, principal, task_id)
        if kind is not None and row.kind != kind:
            raise NotFound(f"{kind} turn not found", details={"task_id": str(task_id)})
        repo = TaskRepository(uow.session)
        now = utcnow()
        cancelled = await repo.transition(
            row.tenant_id,
            row.id,
            sources=[TaskStatus.QUEUED.value],
            values=terminal_values(TaskStatus.CANCELLED, now),
        )
        if cancelled is None:
            cancelled = await repo.transition(
                row.tenant_id,
                row.id,
                sources=[TaskStatus.RUNNING.value],
                values={"cancel_requested": True, "updated_at": now},
            )
            if cancelled is None:
                current = await repo.get(row.tenant_id, row.id)
                status = current.status if current is not None else row.status
                raise Conflict(
                    f"task is {status}; only queued or running tasks can be cancelled",
                    details={"status": status},
                )
        audit.record(uow, principal, "task.cancel", "task", str(task_id))

        async def notify() -> None:
            if cancelled.status == TaskStatus.CANCELLED:
                count_finished(cancelled)
                await self.bus.publish(status_event(cancelled))
                await self._ended_elsewhere(cancelled)  # it may have been next in line
            else:
                await self.bus.publish_control({"action": "cancel", "task_id": str(cancelled.id)})

        uow.after_commit(notify)
        return cancelled

    # --- worker side: each call is its own transaction ------------------------------------
    async def claim(
        self,
        tenant_id: str,
        task_id: uuid.UUID,
        worker_id: str,
        session_move: SessionMove | None = None,
        session_id: uuid.UUID | None = None,
    ) -> Claim | None:
        """Take the lease: exactly one claimant wins; a duplicate delivery loses and is
        dropped (None: the task is running elsewhere, finished, cancelled, or not yet
        due). The caller announces the claimed row (the runner does so while its handler
        starts).

        `session_move(tenant_id, session_id, now)` is the task's session's transition,
        made only when the claim wins. With the session's id known beforehand (the
        delivery carries it) it travels in the claim's statement on PostgreSQL
        (task_session.py); otherwise, and on SQLite, it is a second statement (in the
        claim's transaction on SQLite; on PostgreSQL the ledger's sessions are
        autocommit, so the claim stands whatever happens to it)."""
        now = utcnow()
        claim = status_write(
            tenant_id,
            task_id,
            TaskStatus.RUNNING,
            {
                "lease_owner": worker_id,
                "lease_expires_at": now + self.lease,
                "attempt": Add(1),
                "started_at": now,
                "updated_at": now,
                "not_before": None,
            },
            Guard(not_cancelled=True, due_at=now, turn_free=True, batch_slot=True),
        )
        async with self.factory() as db:
            if (
                session_move is not None
                and session_id is not None
                and isinstance(db, DriverSession)
            ):
                row, moved = await move_together(
                    db, claim, session_move(tenant_id, session_id, now)
                )
                return None if row is None else Claim(row, moved, now)
            row = await TASKS.one(db, *claim)
            won = None if row is None else Claim(row, None, now)
            if won is not None and session_move is not None:
                won = await self._move_session(db, won, session_move)
            await db.commit()
        return won

    async def move_session(self, claim: Claim, session_move: SessionMove) -> Claim:
        """The claimed task's session's transition after the claim, on its own."""
        async with self.factory() as db:
            claim = await self._move_session(db, claim, session_move)
            await db.commit()
        return claim

    @staticmethod
    async def _move_session(db: AsyncSession, claim: Claim, session_move: SessionMove) -> Claim:
        task = claim.task
        if task.session_id is None:
            return claim
        moved = await SESSIONS.one(db, *session_move(task.tenant_id, task.session_id, claim.at))
        return Claim(task, moved, claim.at)

    async def renew(self, task: TaskRow, worker_id: str) -> Renewal:
        now = utcnow()
        async with self.factory() as db:
            row = await TaskRepository(db).transition(
                task.tenant_id,
                task.id,
                sources=[TaskStatus.RUNNING.value],
                values={"lease_expires_at": now + self.lease, "progress": task.progress},
                guard=held_by(task, worker_id),
            )
            await db.commit()
        if row is None:
            return Renewal.LOST
        return Renewal.CANCEL if row.cancel_requested else Renewal.ALIVE

    async def finish(
        self,
        task: TaskRow,
        worker_id: str,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: TaskErrorInfo | None = None,
    ) -> TaskRow | None:
        """A terminal state, written only by the lease holder."""
        row = await self._run(self.finishing(task, worker_id, status, result=result, error=error))
        if row is not None:
            await self.announce(row)
        return row

    def finishing(
        self,
        task: TaskRow,
        worker_id: str,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: TaskErrorInfo | None = None,
    ) -> Bound:
        """`finish`'s statement, for a handler that writes it with its own final writes
        (db/repositories/turn_end.py); it then calls `announce` itself."""
        values = terminal_values(status, utcnow())
        values.update(
            result=result, error=error.model_dump() if error else None, progress=task.progress
        )
        return owned_write(task, worker_id, status, values)

    async def announce(self, row: TaskRow) -> None:
        """Publish a committed state change (and count a finished task)."""
        await self.bus.publish(self.announcement(row))

    def announcement(self, row: TaskRow) -> Event:
        """`announce` for a caller that publishes the event together with others."""
        if row.status in TERMINAL:
            count_finished(row)
        return status_event(row)

    async def wake_next_in_session(self, tenant_id: str, session_id: uuid.UUID) -> None:
        """After a turn ends, hand the session's next queued turn a fresh delivery (its
        earlier deliveries were dropped while this turn held the session)."""
        async with self.factory() as db:
            nxt = await TaskRepository(db).next_in_session(tenant_id, session_id)
        if nxt is not None:
            await self._redeliver(nxt)

    async def retry_later(
        self, task: TaskRow, worker_id: str, error: TaskErrorInfo, delay: float
    ) -> TaskRow | None:
        now = utcnow()
        values = {
            "error": error.model_dump(),
            "not_before": now + timedelta(seconds=delay),
            "delivery": Add(1),
            **unleased(now),
        }
        row = await self._requeue_owned(task, worker_id, values)
        if row is not None and row.status == TaskStatus.QUEUED:
            await self.producer.deliver(row, delay=delay)
        return row  # cancelled instead: the runner's settled hooks follow, as for any end

    async def release(self, task: TaskRow, worker_id: str) -> TaskRow | None:
        """Give a task back on shutdown; the interrupted attempt is not counted."""
        now = utcnow()
        values: dict[str, Any] = {"attempt": Add(-1), "delivery": Add(1)}
        values.update(unleased(now))
        row = await self._requeue_owned(task, worker_id, values)
        if row is not None and row.status == TaskStatus.QUEUED:
            await self.producer.deliver(row)
        elif row is not None:  # cancelled: no settled hook runs on shutdown
            await self._ended_elsewhere(row)
        return row

    async def _requeue_owned(
        self, task: TaskRow, worker_id: str, values: dict[str, Any]
    ) -> TaskRow | None:
        """Back to `queued` by its lease holder, unless a cancel was asked meanwhile: it
        then ends `cancelled` (flagged and queued, every claim would refuse it and it would
        never end). The flag is read by the statement itself, so a cancel racing the
        requeue is seen either way."""
        owned = held_by(task, worker_id)
        unflagged = replace(owned, not_cancelled=True)
        row = await self._write(task.tenant_id, task.id, TaskStatus.QUEUED, values, unflagged)
        if row is None:
            # Still running and ours, the flag is why (it is never taken back); not ours
            # or not running any more, this write finds nothing either.
            ended = {**terminal_values(TaskStatus.CANCELLED, utcnow()), "progress": task.progress}
            running = [TaskStatus.RUNNING.value]
            row = await self._write(
                task.tenant_id, task.id, TaskStatus.CANCELLED, ended, owned, running
            )
        if row is not None:
            await self.announce(row)
        return row

    async def save_service_calls(self, task: TaskRow, calls: list[ServiceCallRow]) -> None:
        """Record a task's steps (a turn that ends well writes them with its end)."""
        async with self.factory() as session:
            await TaskRepository(session).replace_service_calls(task.tenant_id, task.id, calls)
            await session.commit()

    # --- reconciler (system sweeps; safe to run on every worker at once) ------------------
    async def recover_expired_leases(self, batch: int = 100) -> int:
        now = utcnow()
        async with self.factory() as db:
            expired = await TaskRepository(db).expired_leases(now, batch)
        recovered = 0
        for row in expired:
            still_expired = Guard(lease_expired_before=now)
            cancelled = row.cancel_requested
            done: TaskRow | None = None
            if not cancelled and row.attempt >= row.max_attempts:
                error = TaskErrorInfo(
                    code="worker_lost",
                    message=f"the worker running attempt {row.attempt} of {row.max_attempts} "
                    "stopped renewing its lease",
                    retryable=False,
                )
                values = terminal_values(TaskStatus.FAILED, now)
                values["error"] = error.model_dump()
                done = await self._write(
                    row.tenant_id, row.id, TaskStatus.FAILED, values, still_expired
                )
            elif not cancelled:
                values = {"delivery": Add(1), **unleased(now)}
                unflagged = replace(still_expired, not_cancelled=True)
                done = await self._write(
                    row.tenant_id, row.id, TaskStatus.QUEUED, values, unflagged
                )
                # Nothing written: a cancel asked after the read (the write below ends
                # the task), or another hand came first (that write finds nothing either).
                cancelled = done is None
            if cancelled:
                done = await self._write(
                    row.tenant_id,
                    row.id,
                    TaskStatus.CANCELLED,
                    terminal_values(TaskStatus.CANCELLED, now),
                    still_expired,
                    [TaskStatus.RUNNING.value],
                )
            if done is None:
                continue  # another reconciler, or the worker itself, got there first
            recovered += 1
            log.warning(
                "recovered task with expired lease",
                task_id=str(row.id),
                owner=row.lease_owner,
                status=done.status,
            )
            if done.status in TERMINAL:
                count_finished(done)
            await self.bus.publish(status_event(done))
            if done.status == TaskStatus.QUEUED:
                await self.producer.deliver(done)
            else:  # its worker is gone: nobody else frees what it held
                await self._ended_elsewhere(done)
        return recovered

    def on_ended_elsewhere(self, hook: EndHook) -> None:
        """`hook(row)` runs after a task ends outside a worker's attempt (a queued task
        cancelled by the API, a task the reconciler fails or cancels), where the runner's
        settled hooks never see it: a batch hands the item's slot on (services/batches.py)."""
        self._end_hooks.append(hook)

    async def _ended_elsewhere(self, row: TaskRow) -> None:
        if row.session_id is not None:  # the session's next turn may run now
            await self.wake_next_in_session(row.tenant_id, row.session_id)
        for hook in self._end_hooks:
            try:
                await hook(row)
            except Exception:  # the reconciler's sweeps repair what a hook left undone
                log.exception("task end hook failed", task_id=str(row.id))

    async def redeliver_lost(self, stale_after: float, batch: int = 100) -> int:
        """Queued tasks whose delivery the queue no longer holds (Redis lost it, or a
        process died between commit and enqueue) get a fresh delivery."""
        now = utcnow()
        async with self.factory() as db:
            stale = await TaskRepository(db).queued_before(
                now - timedelta(seconds=stale_after), batch
            )
        redelivered = 0
        for row in stale:
            if await self.producer.is_pending(row):
                continue
            if await self._redeliver(row):
                redelivered += 1
                log.warning("re-delivered queued task absent from the queue", task_id=str(row.id))
        return redelivered

    # --- helpers ----------------------------------------------------------------------
    async def _redeliver(self, row: TaskRow) -> bool:
        """A fresh delivery for a queued task, unless another one was given since `row`
        was read (a redelivery, not a transition: the task stays `queued`)."""
        bumped = await self._write(
            row.tenant_id,
            row.id,
            TaskStatus.QUEUED,
            {"delivery": Add(1), "updated_at": utcnow()},
            Guard(delivery=row.delivery),
            sources=[TaskStatus.QUEUED.value],
        )
        if bumped is None:
            return False
        await self.producer.deliver(bumped, delay=seconds_until(bumped.not_before))
        return True

    async def _write(
        self,
        tenant_id: str,
        task_id: uuid.UUID,
        target: TaskStatus,
        values: dict[str, Any],
        guard: Guard = Guard(),
        sources: list[str] | None = None,
    ) -> TaskRow | None:
        transition = status_write(tenant_id, task_id, target, values, guard, sources)
        return await self._run(transition)

    async def _run(self, transition: Bound) -> TaskRow | None:
        """A task's transition, in a session of its own."""
        async with self.factory() as session:
            row = await TASKS.one(session, *transition)
            await session.commit()
        return row
