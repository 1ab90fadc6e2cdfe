"""Batches: one request's items, each run as a task of the ledger, a bounded number at once.

Submission writes the batch, and for each item its session, its user message and its
`queued` task, in one transaction; after the commit the first `max_parallel` items are
delivered. The claim lets an item start only while fewer than `max_parallel` of its
batch's items run or wait before it (db/repositories/tasks.py), and each item that ends
hands its slot on (`settle`). The batch ends, exactly once, when no item is queued or
running: `completed`, or `cancelled` when a cancel was asked; then its webhook, if it
has one, is queued as a task of its own (queue/tasks/batch_tasks.py), retried like any.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.clients.webhooks import Reach, refusal
from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.batches import (
    BATCH_ITEM_KIND,
    BATCHES,
    BatchRepository,
)
from agent_orchestrator.db.repositories.messages import MESSAGES
from agent_orchestrator.db.tables import BatchRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import Conflict, NotFound, ValidationFailed, field_problem
from agent_orchestrator.events.bus import EventBus
from agent_orchestrator.events.models import Event, EventType
from agent_orchestrator.ids import new_id
from agent_orchestrator.models.batch import (
    BatchCounts,
    BatchItemResult,
    BatchRequest,
    BatchResponse,
    BatchStatus,
)
from agent_orchestrator.models.pagination import Page
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.models.session import SessionCreate
from agent_orchestrator.models.task import TERMINAL, TaskErrorInfo, TaskStatus
from agent_orchestrator.observability import audit
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import BATCHES_FINISHED
from agent_orchestrator.services.orchestrator import DEFAULT_AGENT, turn_input, user_message
from agent_orchestrator.services.session_manager import SessionManager, may_see, sees_whole_tenant
from agent_orchestrator.services.task_ledger import Submission, TaskLedger
from agent_orchestrator.services.token_budget import TokenBudget

log = get_logger(__name__)

#: The kind of the task that POSTs a finished batch to its `callback_url`.
CALLBACK_KIND = "batch_callback"


def to_response(row: BatchRow, counts: dict[str, int]) -> BatchResponse:
    return BatchResponse(
        id=row.id,
        operation=row.operation,
        status=BatchStatus(row.status),
        total=row.total,
        counts=BatchCounts(**counts),
        max_parallel=row.max_parallel,
        cancel_requested=row.cancel_requested,
        callback_url=row.callback_url,
        metadata=row.metadata_,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        events_url=f"/api/v1/batch/{row.id}/events",
        results_url=f"/api/v1/batch/{row.id}/results",
    )


def to_result(row: TaskRow) -> BatchItemResult:
    return BatchItemResult(
        index=int(row.input.get("index", 0)),
        task_id=row.id,
        session_id=row.session_id,
        status=TaskStatus(row.status),
        result=row.result,
        error=TaskErrorInfo(**row.error) if row.error else None,
        finished_at=row.finished_at,
    )


def request_digest(request: BatchRequest) -> str:
    """The request as canonical JSON (keys sorted), hashed."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def progress_event(row: BatchRow, counts: dict[str, int]) -> Event:
    done = sum(n for status, n in counts.items() if status in TERMINAL)
    return Event(
        type=EventType.BATCH_PROGRESS,
        tenant_id=row.tenant_id,
        data={
            "batch_id": str(row.id),
            "status": row.status,
            "total": row.total,
            "completed": done,
            "counts": BatchCounts(**counts).model_dump(),  # every status, zeros included
        },
    )


def _not_found(batch_id: uuid.UUID) -> NotFound:
    return NotFound("batch not found", details={"batch_id": str(batch_id)})


class BatchManager:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionManager,
        ledger: TaskLedger,
        bus: EventBus,
        db_factory: async_sessionmaker[AsyncSession],
        reach: Reach,
        budget: TokenBudget,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.ledger = ledger
        self.bus = bus
        self.db_factory = db_factory
        self.reach = reach
        self.budget = budget
        # Items that end outside a worker's attempt (cancelled while queued, failed by the
        # reconciler) settle their batch too: the runner's settled hook never sees them.
        ledger.on_ended_elsewhere(self.item_settled)
        # A batch's progress events leave in the order its states were read (see `settle`).
        self._settling = asyncio.Lock()

    # --- API side --------------------------------------------------------------------
    async def submit(
        self,
        uow: UnitOfWork,
        principal: Principal,
        request: BatchRequest,
        idempotency_key: str | None,
    ) -> tuple[BatchResponse, bool]:
        """Write the batch and its items; deliver the first ones after the commit. With an
        idempotency key this tenant already used, answer with that batch (created=False)."""
        max_parallel = self._check(request)
        repo = BatchRepository(uow.session)
        if idempotency_key is not None:
            existing = await repo.by_idempotency_key(principal.tenant_id, idempotency_key)
            if existing is not None:
                return await self._same_request(uow, principal, existing, request), False
        await self.budget.check(principal.tenant_id, "api")
        now = utcnow()
        row = BATCHES.new(
            id=new_id(),
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            operation=request.operation.value,
            status=BatchStatus.RUNNING.value,
            total=len(request.items),
            max_parallel=max_parallel,
            callback_url=request.callback_url,
            idempotency_key=idempotency_key,
            request_digest=request_digest(request),
            cancel_requested=False,
            metadata_=request.metadata,
            created_at=now,
            updated_at=now,
            finished_at=None,
        )
        if idempotency_key is None:
            uow.insert_at_commit(BATCHES, row)  # nothing reads it back before the commit
        else:
            key = idempotency_key
            winner = await uow.insert_unless_raced(
                BATCHES, row, lambda: repo.by_idempotency_key(principal.tenant_id, key)
            )
            if winner is not None:  # a request with the same key got there first
                return await self._same_request(uow, principal, winner, request), False
        await self._add_items(uow, principal, row, request)
        audit.record(
            uow,
            principal,
            "batch.submit",
            "batch",
            str(row.id),
            {"operation": row.operation, "items": row.total},
        )

        async def start() -> None:
            try:  # first: the batch's log opens with it, before any item's end
                await self.bus.publish(progress_event(row, {"queued": row.total}))
            except Exception as error:  # the items need not wait for it
                log.warning("could not announce the batch", error=str(error))
            await self.ledger.deliver_ready_in_batch(row.tenant_id, row.id, row.max_parallel)

        uow.after_commit(start)
        return to_response(row, {"queued": row.total}), True

    def _check(self, request: BatchRequest) -> int:
        """What depends on settings (the model checks the rest): the item count, the
        parallelism, and whether the callback URL may be called. Returns the parallelism."""
        problems = []
        if len(request.items) > self.settings.batch_max_items:
            limit = self.settings.batch_max_items
            problems.append(field_problem("items", "body", f"at most {limit} items"))
        max_parallel = request.max_parallel or self.settings.batch_default_parallel
        if max_parallel > self.settings.batch_max_parallel:
            limit = self.settings.batch_max_parallel
            problems.append(field_problem("max_parallel", "body", f"at most {limit}"))
        if request.callback_url is not None:
            reason = refusal(request.callback_url, self.reach)
            if reason is None and self.settings.webhook_secret is None:
                reason = "webhooks are not enabled on this service (WEBHOOK_SECRET is unset)"
            if reason is not None:
                problems.append(field_problem("callback_url", "body", reason))
        if problems:
            raise ValidationFailed("the batch request is not valid", details=problems)
        return max_parallel

    async def _add_items(
        self, uow: UnitOfWork, principal: Principal, batch: BatchRow, request: BatchRequest
    ) -> None:
        """Each item is a chat turn in a session of its own, as `POST /api/v1/chat`
        without a `session_id` would write it."""
        for index, item in enumerate(request.items):
            agent_id = item.agent_id or request.agent_id or DEFAULT_AGENT
            session_id = new_id()
            task = self.ledger.add_batch_item(
                uow,
                principal,
                Submission(
                    kind=BATCH_ITEM_KIND,
                    queue=self.settings.queue_bulk,
                    input={**turn_input(item.message, agent_id, "async"), "index": index},
                    session_id=session_id,
                    batch_id=batch.id,
                ),
            )
            await self.sessions.create(
                uow,
                principal,
                SessionCreate(agent_id=agent_id, metadata={"batch_id": str(batch.id)}),
                session_id=session_id,
                hot_copy=False,  # the worker writes it as it claims the item
            )
            uow.insert_at_commit(MESSAGES, user_message(task, item.message, item.metadata))

    async def _same_request(
        self, uow: UnitOfWork, principal: Principal, row: BatchRow, request: BatchRequest
    ) -> BatchResponse:
        """A repeated Idempotency-Key answers with its batch only for the same caller and
        the same request; anything else is a conflict that reveals nothing."""
        if row.user_id != principal.user_id or row.request_digest != request_digest(request):
            raise Conflict(
                "this Idempotency-Key was already used for a different request",
                details={"header": "Idempotency-Key"},
            )
        return await self._response(uow.session, row)

    async def view(
        self, uow: UnitOfWork, principal: Principal, batch_id: uuid.UUID
    ) -> BatchResponse:
        row = await self.load_visible(uow.session, principal, batch_id)
        return await self._response(uow.session, row)

    async def load_visible(
        self, db: AsyncSession, principal: Principal, batch_id: uuid.UUID
    ) -> BatchRow:
        row = await BatchRepository(db).get(principal.tenant_id, batch_id)
        if row is None or not may_see(principal, row.user_id):
            raise _not_found(batch_id)
        return row

    async def _response(self, db: AsyncSession, row: BatchRow) -> BatchResponse:
        counts = await BatchRepository(db).counts([row])
        return to_response(row, counts[row.id])

    async def page(
        self, uow: UnitOfWork, principal: Principal, *, limit: int, cursor: str | None
    ) -> Page[BatchResponse]:
        repo = BatchRepository(uow.session)
        rows, next_cursor = await repo.page(
            principal.tenant_id,
            user_id=None if sees_whole_tenant(principal) else principal.user_id,
            limit=limit,
            cursor=cursor,
        )
        counts = await repo.counts(rows)
        items = [to_response(row, counts[row.id]) for row in rows]
        return Page(items=items, next_cursor=next_cursor)

    async def results(
        self,
        uow: UnitOfWork,
        principal: Principal,
        batch_id: uuid.UUID,
        *,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
    ) -> Page[BatchItemResult]:
        row = await self.load_visible(uow.session, principal, batch_id)
        items, next_cursor = await BatchRepository(uow.session).items(
            row.tenant_id,
            row.id,
            status=status.value if status else None,
            limit=limit,
            cursor=cursor,
        )
        return Page(items=[to_result(item) for item in items], next_cursor=next_cursor)

    async def cancel(
        self, uow: UnitOfWork, principal: Principal, batch_id: uuid.UUID
    ) -> BatchResponse:
        """Queued items end `cancelled` at once, running ones are stopped; the batch ends
        `cancelled` when the last of them has. An ended batch is a 409."""
        row = await self.load_visible(uow.session, principal, batch_id)
        repo = BatchRepository(uow.session)
        flagged = await repo.request_cancel(row.tenant_id, row.id, utcnow())
        if flagged is None:
            current = await repo.get(row.tenant_id, row.id)  # it may have ended meanwhile
            status = current.status if current is not None else row.status
            raise Conflict(
                f"batch is {status}; only a running batch can be cancelled",
                details={"status": status},
            )
        await self.ledger.cancel_batch_items(uow, row.tenant_id, row.id)
        audit.record(uow, principal, "batch.cancel", "batch", str(row.id))

        async def settle() -> None:
            await self.settle(row.tenant_id, row.id)

        uow.after_commit(settle)
        return await self._response(uow.session, flagged)

    # --- as items end ------------------------------------------------------------------
    async def item_settled(self, task: TaskRow) -> None:
        """The settled hook of an item's attempt (however it ended)."""
        if task.batch_id is not None:
            await self.settle(task.tenant_id, task.batch_id)

    async def settle(self, tenant_id: str, batch_id: uuid.UUID) -> None:
        """After the batch's items changed: its end when none is left to run (exactly
        once, with its webhook queued in the same transaction), else its progress and
        deliveries for the items that may start now.

        Progress is published while the batch's row is locked (and, within this process,
        under a lock): one published by another process cannot overtake it, so nothing
        follows the final event in the batch's log."""
        async with self._settling, UnitOfWork(self.db_factory) as uow:
            repo = BatchRepository(uow.session)
            row = await repo.get(tenant_id, batch_id, for_update=True)
            if row is None or row.status != BatchStatus.RUNNING:
                return
            ended = await repo.finish_if_done(tenant_id, batch_id, utcnow())
            if ended is not None and ended.callback_url:
                await self._queue_callback(uow, ended)
            counts = (await repo.counts([row]))[batch_id]
            if ended is None:
                await self.bus.publish(progress_event(row, counts))
            else:
                final = progress_event(ended, counts)

                async def announce_end() -> None:
                    BATCHES_FINISHED.labels(ended.status).inc()
                    await self.bus.publish(final)
                    log.info("batch ended", batch_id=str(batch_id), status=ended.status)

                uow.after_commit(announce_end)
        if ended is None:
            await self.ledger.deliver_ready_in_batch(tenant_id, batch_id, row.max_parallel)

    async def _queue_callback(self, uow: UnitOfWork, batch: BatchRow) -> None:
        owner = Principal(tenant_id=batch.tenant_id, user_id=batch.user_id, scopes=frozenset())
        await self.ledger.submit(
            uow,
            owner,
            Submission(
                kind=CALLBACK_KIND,
                queue=self.settings.queue_bulk,
                input={"batch_id": str(batch.id), "url": batch.callback_url},
                max_attempts=self.settings.webhook_max_attempts,
            ),
        )

    async def sweep(self, limit: int = 100) -> int:
        """*System sweep* (the reconciler's), for what a process that stopped left undone:
        end the batches whose last item has ended, and deliver the items that may start
        in batches whose items have waited QUEUED_STALE_AFTER (their slot's hand-over, or
        the submission's first deliveries, did not happen; a delivery still in the queue
        is left alone). Returns how many batches it ended and items it delivered."""
        stale = utcnow() - timedelta(seconds=self.settings.queued_stale_after)
        async with self.ledger.factory() as db:
            repo = BatchRepository(db)
            done = await repo.done_but_running(limit)
            waiting = await repo.waiting_since(stale, limit)
        for tenant_id, batch_id in done:
            await self.settle(tenant_id, batch_id)
        delivered = 0
        for tenant_id, batch_id, max_parallel in waiting:
            delivered += await self.ledger.deliver_ready_in_batch(tenant_id, batch_id, max_parallel)
        return len(done) + delivered

    async def callback_payload(self, tenant_id: str, batch_id: uuid.UUID) -> dict[str, Any] | None:
        """What the webhook carries: the batch as `GET /api/v1/batch/{id}` shows it."""
        async with self.ledger.factory() as db:
            row = await BatchRepository(db).get(tenant_id, batch_id)
            if row is None:
                return None
            response = await self._response(db, row)
        return {"type": "batch.completed", "batch": response.model_dump(mode="json")}
