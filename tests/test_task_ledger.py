"""The task ledger on both backends (SQLite with the in-process queue and bus; PostgreSQL
with SAQ and the event bus on Redis), with no worker running so each test drives the
ledger itself: the transition table, claims only one claimant wins, leases, idempotency,
and the reconciler's repairs (safe to run concurrently)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.prepared import Bound
from agent_orchestrator.db.repositories.sessions import SessionMove, SessionRepository
from agent_orchestrator.db.repositories.tasks import TaskRepository
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import Conflict
from agent_orchestrator.events.models import StreamKey
from agent_orchestrator.ids import new_id
from agent_orchestrator.lifecycle import build_state, close_state
from agent_orchestrator.models.principal import USER_SCOPES, Principal
from agent_orchestrator.models.session import SessionCreate, SessionState
from agent_orchestrator.models.task import TERMINAL, TRANSITIONS, TaskErrorInfo, TaskStatus
from agent_orchestrator.queue.base import Delivery
from agent_orchestrator.queue.producer import delivery_of
from agent_orchestrator.queue.reconciler import Reconciler
from agent_orchestrator.services.task_ledger import Renewal, Submission
from agent_orchestrator.state import AppState, build_verifier

ALICE = Principal("tenant-a", "user-1", frozenset(USER_SCOPES))
BOB = Principal("tenant-b", "user-1", frozenset(USER_SCOPES))


@pytest.fixture
async def core(make_backend_settings: Callable[..., Settings]) -> AsyncIterator[AppState]:
    """The process state an API instance builds (`serve --no-worker`): no worker, so
    nothing claims a task unless the test does."""
    settings = make_backend_settings()
    state = await build_state(settings, build_verifier(settings), run_worker=False)
    try:
        yield state
    finally:
        await close_state(state)


async def claim(core: AppState, task: TaskRow, worker: str) -> TaskRow | None:
    """Take the lease as the runner does, and announce it."""
    claimed = await core.ledger.claim(task.tenant_id, task.id, worker)
    if claimed is None:
        return None
    await core.ledger.announce(claimed.task)
    return claimed.task


async def submit(
    core: AppState,
    principal: Principal = ALICE,
    *,
    key: str | None = None,
    max_attempts: int | None = None,
) -> tuple[TaskRow, bool]:
    async with UnitOfWork(core.db_factory) as uow:
        return await core.ledger.submit(
            uow,
            principal,
            Submission(
                kind="test.sleep",
                queue="interactive",
                input={"seconds": 0.01},
                idempotency_key=key,
                max_attempts=max_attempts,
            ),
        )


async def load(core: AppState, task: TaskRow) -> TaskRow:
    async with core.db_factory() as db:
        row = await TaskRepository(db).get(task.tenant_id, task.id)
    assert row is not None
    return row


async def force(core: AppState, task: TaskRow, **values: Any) -> None:
    """Put a row in a given state behind the ledger's back (what time or a crash does)."""
    async with core.db_factory() as db:
        await db.execute(update(TaskRow).where(TaskRow.id == task.id).values(**values))
        await db.commit()


async def statuses_published(core: AppState, task: TaskRow) -> list[str]:
    events = await core.bus.replay(StreamKey("task", task.tenant_id, str(task.id)), None, 1000)
    return [event.data["status"] for event in events if event.type == "task.status"]


def count_enqueues(core: AppState, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every delivery handed to the queue, by task id."""
    counts: Counter[str] = Counter()
    queue = core.ledger.producer.queue
    original = queue.enqueue

    async def counting(delivery: Delivery, *, delay: float = 0.0) -> bool:
        counts[delivery.task_id] += 1
        return await original(delivery, delay=delay)

    monkeypatch.setattr(queue, "enqueue", counting)
    return counts


async def lose_delivery(core: AppState, task: TaskRow) -> None:
    """The queue forgets the task's delivery (taken and acknowledged by a process that
    died before claiming it; Redis losing its data looks the same to the ledger)."""
    received = await core.queue.receive("interactive", wait_seconds=1.0)
    assert received is not None
    assert received.delivery == delivery_of(task)
    await received.done()
    assert not await core.queue.is_pending(delivery_of(task))


# --- the transition table ---------------------------------------------------------------
def test_the_transition_table() -> None:
    assert TRANSITIONS[TaskStatus.QUEUED] == {
        TaskStatus.RUNNING,
        TaskStatus.CANCELLED,
        TaskStatus.FAILED,
    }
    assert TRANSITIONS[TaskStatus.RUNNING] == {TaskStatus.QUEUED} | TERMINAL
    for terminal in TERMINAL:
        assert TRANSITIONS[terminal] == frozenset(), f"{terminal} must be final"
    assert set(TRANSITIONS) == set(TaskStatus)


async def test_every_write_obeys_the_transition_table(core: AppState) -> None:
    task, _ = await submit(core)
    for source in TaskStatus:
        for target in TaskStatus:
            await force(core, task, status=source.value)
            # The ledger's single write path; every public move goes through it.
            moved = await core.ledger._write(task.tenant_id, task.id, target, {})
            after = (await load(core, task)).status
            if target in TRANSITIONS[source]:
                assert moved is not None, f"{source} -> {target} was refused"
                assert after == target
            else:
                assert moved is None, f"{source} -> {target} was allowed"
                assert after == source


async def test_illegal_moves_through_the_ledger_api_do_nothing(core: AppState) -> None:
    task, _ = await submit(core)

    # Finishing a queued task: refused, even by a caller naming the owner it has.
    assert await core.ledger.finish(task, "w1", TaskStatus.SUCCEEDED, result={}) is None
    await force(core, task, lease_owner="w1")
    assert await core.ledger.finish(task, "w1", TaskStatus.SUCCEEDED, result={}) is None
    assert await core.ledger.release(task, "w1") is None
    row = await load(core, task)
    assert row.status == TaskStatus.QUEUED
    assert row.result is None
    assert row.delivery == 1
    await force(core, task, lease_owner=None)

    claimed = await claim(core, task, "w1")
    assert claimed is not None
    assert claimed.attempt == 1
    done = await core.ledger.finish(claimed, "w1", TaskStatus.SUCCEEDED, result={"ok": True})
    assert done is not None
    assert done.status == TaskStatus.SUCCEEDED

    # A finished task stays finished: no claim, no retry, no progress, no second ending.
    assert await claim(core, task, "w2") is None
    assert await claim(core, task, "w1") is None
    error = TaskErrorInfo(code="x", message="y", retryable=True)
    assert await core.ledger.retry_later(claimed, "w1", error, 0.0) is None
    assert await core.ledger.finish(claimed, "w1", TaskStatus.FAILED, error=error) is None
    claimed.progress = {"steps_completed": 9, "steps_total": 9}
    assert await core.ledger.renew(claimed, "w1") is Renewal.LOST  # renewal writes progress
    with pytest.raises(Conflict):
        async with UnitOfWork(core.db_factory) as uow:
            await core.ledger.request_cancel(uow, ALICE, task.id)

    row = await load(core, task)
    assert row.status == TaskStatus.SUCCEEDED
    assert row.attempt == 1
    assert row.result == {"ok": True}
    assert row.error is None
    assert row.progress == {}
    assert await statuses_published(core, task) == ["queued", "running", "succeeded"]


async def test_a_cancelled_queued_task_cannot_be_claimed(core: AppState) -> None:
    task, _ = await submit(core)
    async with UnitOfWork(core.db_factory) as uow:
        cancelled = await core.ledger.request_cancel(uow, ALICE, task.id)
    assert cancelled.status == TaskStatus.CANCELLED
    assert await claim(core, task, "w1") is None
    row = await load(core, task)
    assert row.status == TaskStatus.CANCELLED
    assert row.attempt == 0


async def test_only_the_lease_owner_writes(core: AppState) -> None:
    task, _ = await submit(core)
    claimed = await claim(core, task, "owner")
    assert claimed is not None

    # Progress reaches the ledger with lease renewals: only the owner's.
    claimed.progress = {"steps_completed": 1, "steps_total": 2}
    assert await core.ledger.renew(claimed, "intruder") is Renewal.LOST
    assert await core.ledger.finish(claimed, "intruder", TaskStatus.SUCCEEDED) is None
    assert await core.ledger.release(claimed, "intruder") is None
    row = await load(core, task)
    assert row.progress == {}
    assert row.status == TaskStatus.RUNNING
    assert row.lease_owner == "owner"

    assert await core.ledger.renew(claimed, "owner") is Renewal.ALIVE
    assert (await load(core, task)).progress == {"steps_completed": 1, "steps_total": 2}
    async with UnitOfWork(core.db_factory) as uow:
        flagged = await core.ledger.request_cancel(uow, ALICE, task.id)
    assert flagged.status == TaskStatus.RUNNING
    assert flagged.cancel_requested
    assert await core.ledger.renew(claimed, "owner") is Renewal.CANCEL

    assert await core.ledger.finish(claimed, "owner", TaskStatus.CANCELLED) is not None
    assert await core.ledger.renew(claimed, "owner") is Renewal.LOST
    row = await load(core, task)
    assert row.status == TaskStatus.CANCELLED
    assert row.lease_owner is None


async def test_concurrent_claimants_exactly_one_wins(core: AppState) -> None:
    task, _ = await submit(core)
    workers = [f"worker-{n}" for n in range(10)]

    results = await asyncio.gather(*(claim(core, task, worker) for worker in workers))

    winners = [(worker, row) for worker, row in zip(workers, results, strict=True) if row]
    assert len(winners) == 1, [worker for worker, _ in winners]
    winner, claimed = winners[0]
    row = await load(core, task)
    assert row.status == TaskStatus.RUNNING
    assert row.lease_owner == winner == claimed.lease_owner
    assert row.attempt == 1
    assert await statuses_published(core, task) == ["queued", "running"]


# --- idempotency ------------------------------------------------------------------------
async def test_an_idempotency_key_gives_one_task(core: AppState) -> None:
    first, created = await submit(core, key="order-1")
    again, created_again = await submit(core, key="order-1")
    other_tenant, created_other = await submit(core, BOB, key="order-1")

    assert created
    assert not created_again
    assert again.id == first.id
    assert created_other
    assert other_tenant.id != first.id
    # Only the created task was delivered and announced.
    assert await core.queue.depth("interactive") == 2
    assert await statuses_published(core, first) == ["queued"]


async def test_concurrent_submissions_with_one_key_give_one_task(core: AppState) -> None:
    results = await asyncio.gather(*(submit(core, key="same-key") for _ in range(5)))

    ids = {row.id for row, _ in results}
    assert len(ids) == 1
    assert sorted(created for _, created in results) == [False, False, False, False, True]
    assert await core.queue.depth("interactive") == 1


# --- reconciler: expired leases ------------------------------------------------------------
async def test_an_expired_lease_is_requeued(core: AppState) -> None:
    task, _ = await submit(core)
    await lose_delivery(core, task)  # the dead worker had taken delivery 1
    claimed = await claim(core, task, "dead-worker")
    assert claimed is not None
    live, _ = await submit(core)
    await lose_delivery(core, live)
    assert await claim(core, live, "live-worker") is not None

    assert await core.ledger.recover_expired_leases() == 0  # nothing has expired yet
    await force(core, task, lease_expires_at=utcnow() - timedelta(seconds=30))
    assert await core.ledger.recover_expired_leases() == 1

    row = await load(core, task)
    assert row.status == TaskStatus.QUEUED
    assert row.lease_owner is None
    assert row.lease_expires_at is None
    assert row.attempt == 1  # the lost attempt counts
    assert row.delivery == 2
    assert await core.queue.is_pending(delivery_of(row))
    received = await core.queue.receive("interactive", wait_seconds=1.0)
    assert received is not None
    assert received.delivery == delivery_of(row)
    assert (await load(core, live)).status == TaskStatus.RUNNING  # a live lease is left alone
    assert await statuses_published(core, task) == ["queued", "running", "queued"]

    # The old worker coming back finds it lost the task.
    assert await core.ledger.renew(claimed, "dead-worker") is Renewal.LOST
    assert await core.ledger.finish(claimed, "dead-worker", TaskStatus.SUCCEEDED) is None


async def test_an_expired_lease_on_the_last_attempt_fails_the_task(core: AppState) -> None:
    task, _ = await submit(core, max_attempts=2)
    for attempt in (1, 2):
        claimed = await claim(core, task, f"worker-{attempt}")
        assert claimed is not None
        assert claimed.attempt == attempt
        await force(core, task, lease_expires_at=utcnow() - timedelta(seconds=1))
        assert await core.ledger.recover_expired_leases() == 1

    row = await load(core, task)
    assert row.status == TaskStatus.FAILED
    assert row.error is not None
    assert row.error["code"] == "worker_lost"
    assert row.error["retryable"] is False
    assert row.finished_at is not None
    assert row.lease_owner is None
    assert row.attempt == row.max_attempts == 2
    assert (await statuses_published(core, task))[-1] == "failed"


async def test_an_expired_lease_with_cancel_requested_is_cancelled(core: AppState) -> None:
    task, _ = await submit(core)
    assert await claim(core, task, "dead-worker") is not None
    async with UnitOfWork(core.db_factory) as uow:
        await core.ledger.request_cancel(uow, ALICE, task.id)
    await force(core, task, lease_expires_at=utcnow() - timedelta(seconds=1))

    assert await core.ledger.recover_expired_leases() == 1

    row = await load(core, task)
    assert row.status == TaskStatus.CANCELLED
    assert row.finished_at is not None
    assert row.delivery == 1  # not re-delivered
    assert (await statuses_published(core, task))[-1] == "cancelled"


@pytest.mark.parametrize("how", ["retry", "release"])
async def test_a_flagged_task_given_back_by_its_worker_ends_cancelled(
    core: AppState, how: str
) -> None:
    """A cancel asked while the attempt failed (retry) or the worker stopped (release):
    put back in the queue with its flag, every claim would refuse it and it would never
    end (its batch neither)."""
    task, _ = await submit(core)
    claimed = await claim(core, task, "w1")
    assert claimed is not None
    async with UnitOfWork(core.db_factory) as uow:
        await core.ledger.request_cancel(uow, ALICE, task.id)
    if how == "retry":
        error = TaskErrorInfo(code="flaky", message="try again", retryable=True)
        row = await core.ledger.retry_later(claimed, "w1", error, 0.0)
    else:
        row = await core.ledger.release(claimed, "w1")

    assert row is not None
    assert row.status == TaskStatus.CANCELLED
    stored = await load(core, task)
    assert (stored.status, stored.lease_owner) == (TaskStatus.CANCELLED, None)
    assert stored.finished_at is not None
    assert stored.delivery == 1  # not re-delivered
    assert (await statuses_published(core, task))[-1] == "cancelled"


async def test_an_earlier_attempt_cannot_write_once_the_task_is_claimed_again(
    core: AppState,
) -> None:
    """A worker cut off from the database past its lease: the task is recovered and
    claimed again, by the same worker id even. The first attempt's renewals and end find
    nothing to write; only the new attempt's count."""
    task, _ = await submit(core)
    first = await claim(core, task, "w1")
    assert first is not None
    await force(core, task, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert await core.ledger.recover_expired_leases() == 1
    second = await claim(core, task, "w1")
    assert second is not None
    assert (first.attempt, second.attempt) == (1, 2)

    assert await core.ledger.renew(first, "w1") is Renewal.LOST
    assert await core.ledger.finish(first, "w1", TaskStatus.SUCCEEDED, result={"by": 1}) is None
    error = TaskErrorInfo(code="flaky", message="again", retryable=True)
    assert await core.ledger.retry_later(first, "w1", error, 0.0) is None
    assert await core.ledger.renew(second, "w1") is Renewal.ALIVE
    done = await core.ledger.finish(second, "w1", TaskStatus.SUCCEEDED, result={"by": 2})
    assert done is not None
    assert (await load(core, task)).result == {"by": 2}


async def test_a_cancel_between_the_reconcilers_read_and_write_ends_the_task(
    core: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler read the expired lease before the cancel was asked: put back in the
    queue then, with the flag, every claim would refuse the task and it would never end."""
    task, _ = await submit(core)
    assert await claim(core, task, "dead-worker") is not None
    await force(core, task, lease_expires_at=utcnow() - timedelta(seconds=1))
    read = TaskRepository.expired_leases

    async def read_then_cancel(self: TaskRepository, *args: Any) -> Any:
        rows = await read(self, *args)
        # What request_cancel writes for a running task, on the reader's own session (an
        # embedded database has one connection, which the reader holds).
        flag = update(TaskRow).where(TaskRow.id == task.id).values(cancel_requested=True)
        await self.db.execute(flag)
        await self.db.commit()
        return rows  # as read before the cancel

    monkeypatch.setattr(TaskRepository, "expired_leases", read_then_cancel)
    assert await core.ledger.recover_expired_leases() == 1
    row = await load(core, task)
    assert row.status == TaskStatus.CANCELLED
    assert row.delivery == 1  # not re-delivered
    assert (await statuses_published(core, task))[-1] == "cancelled"


async def test_concurrent_lease_recovery_delivers_once(
    core: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, _ = await submit(core)
    assert await claim(core, task, "dead-worker") is not None
    await force(core, task, lease_expires_at=utcnow() - timedelta(seconds=5))
    enqueues = count_enqueues(core, monkeypatch)

    recovered = await asyncio.gather(*(core.ledger.recover_expired_leases() for _ in range(6)))

    assert sum(recovered) == 1
    assert enqueues[str(task.id)] == 1
    row = await load(core, task)
    assert row.status == TaskStatus.QUEUED
    assert row.delivery == 2
    assert await statuses_published(core, task) == ["queued", "running", "queued"]


# --- reconciler: deliveries the queue lost -------------------------------------------------
async def test_a_queued_task_the_queue_forgot_is_redelivered(core: AppState) -> None:
    stale_after = core.settings.queued_stale_after
    task, _ = await submit(core)
    await lose_delivery(core, task)

    # Not yet stale: a fresh task may simply be between commit and enqueue.
    assert await core.ledger.redeliver_lost(stale_after) == 0
    await force(core, task, updated_at=utcnow() - timedelta(seconds=stale_after + 1))
    assert await core.ledger.redeliver_lost(stale_after) == 1

    row = await load(core, task)
    assert row.status == TaskStatus.QUEUED
    assert row.delivery == 2
    assert row.attempt == 0
    received = await core.queue.receive("interactive", wait_seconds=1.0)
    assert received is not None
    assert received.delivery == delivery_of(row)
    # Once re-delivered (and so pending again) it is left alone.
    assert await core.ledger.redeliver_lost(stale_after) == 0


async def test_a_queued_task_still_in_the_queue_is_not_redelivered(
    core: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_after = core.settings.queued_stale_after
    task, _ = await submit(core)
    await force(core, task, updated_at=utcnow() - timedelta(seconds=stale_after + 1))
    # A retry waiting out its backoff is not lost either.
    waiting, _ = await submit(core)
    await force(
        core,
        waiting,
        updated_at=utcnow() - timedelta(seconds=stale_after + 1),
        not_before=utcnow() + timedelta(seconds=60),
    )
    enqueues = count_enqueues(core, monkeypatch)

    assert await core.ledger.redeliver_lost(stale_after) == 0
    assert not enqueues
    assert (await load(core, task)).delivery == 1


async def test_concurrent_reconcilers_never_double_deliver(
    core: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_after = core.settings.queued_stale_after
    lost, _ = await submit(core)
    await lose_delivery(core, lost)
    await force(core, lost, updated_at=utcnow() - timedelta(seconds=stale_after + 1))
    expired, _ = await submit(core)
    await lose_delivery(core, expired)
    assert await claim(core, expired, "dead-worker") is not None
    await force(core, expired, lease_expires_at=utcnow() - timedelta(seconds=5))
    enqueues = count_enqueues(core, monkeypatch)
    reconcilers = [
        Reconciler(core.ledger, core.queue, interval=1.0, stale_after=stale_after) for _ in range(5)
    ]

    rounds = await asyncio.gather(*(reconciler.run_once() for reconciler in reconcilers))

    assert sum(expired_count for expired_count, _ in rounds) == 1
    assert sum(lost_count for _, lost_count in rounds) == 1
    assert enqueues == {str(lost.id): 1, str(expired.id): 1}
    assert (await load(core, lost)).delivery == 2
    assert (await load(core, expired)).delivery == 2
    assert await core.queue.depth("interactive") == 2


async def submit_in_session(core: AppState, session_id: Any, max_attempts: int) -> TaskRow:
    async with UnitOfWork(core.db_factory) as uow:
        row, _ = await core.ledger.submit(
            uow,
            ALICE,
            Submission(
                kind="test.sleep",
                queue="interactive",
                input={"seconds": 0.01},
                session_id=session_id,
                max_attempts=max_attempts,
            ),
        )
    return row


async def test_a_session_turn_lost_with_its_worker_wakes_the_next_turn(core: AppState) -> None:
    """When the reconciler gives up on a session's running task, the session's next queued
    task gets a fresh delivery at once instead of waiting for QUEUED_STALE_AFTER."""
    session_id = new_id()
    first = await submit_in_session(core, session_id, max_attempts=1)
    second = await submit_in_session(core, session_id, max_attempts=1)
    assert await claim(core, first, "dead-worker") is not None
    # The second turn's delivery was dropped while the first held the session.
    assert await claim(core, second, "other") is None
    before = (await load(core, second)).delivery
    await force(core, first, lease_expires_at=utcnow() - timedelta(seconds=1))

    assert await core.ledger.recover_expired_leases() == 1

    assert (await load(core, first)).status == TaskStatus.FAILED
    woken = await load(core, second)
    assert woken.delivery == before + 1
    assert await core.queue.is_pending(delivery_of(woken))
    assert await claim(core, second, "other") is not None


async def test_cancelling_a_queued_turn_wakes_the_turn_after_it(core: AppState) -> None:
    session_id = new_id()
    first = await submit_in_session(core, session_id, max_attempts=1)
    second = await submit_in_session(core, session_id, max_attempts=1)
    before = (await load(core, second)).delivery
    async with UnitOfWork(core.db_factory) as uow:
        await core.ledger.request_cancel(uow, ALICE, first.id)

    woken = await load(core, second)
    assert woken.delivery == before + 1
    assert await claim(core, second, "worker") is not None


async def new_session(core: AppState) -> uuid.UUID:
    async with UnitOfWork(core.db_factory) as uow:
        session = await core.sessions.create(uow, ALICE, SessionCreate(agent_id="default"))
    return session.id


async def session_state(core: AppState, session_id: uuid.UUID) -> str:
    async with core.db_factory() as db:
        row = await SessionRepository(db).get(ALICE.tenant_id, session_id)
    assert row is not None
    return row.state


def to_state(core: AppState, target: SessionState) -> SessionMove:
    def move(tenant_id: str, session_id: uuid.UUID, now: datetime) -> Bound:
        return core.sessions.turn_mark(tenant_id, session_id, target, now)

    return move


async def test_a_claim_moves_its_session_with_it_and_only_when_it_wins(core: AppState) -> None:
    """The session's change travels with the claim (one statement on PostgreSQL, see the
    chat turn's statement budget) at the claim's own `now`; a claim that loses changes
    nothing, and a session the task is not in is never touched, whatever a delivery says."""
    processing = to_state(core, SessionState.PROCESSING)
    session_id, elsewhere = await new_session(core), await new_session(core)
    task = await submit_in_session(core, session_id, max_attempts=1)

    won = await core.ledger.claim(task.tenant_id, task.id, "w1", processing, session_id)
    assert won is not None
    assert won.session is not None
    assert (won.task.status, won.task.lease_owner) == (TaskStatus.RUNNING, "w1")
    assert (won.session.id, won.session.state) == (session_id, "processing")
    assert won.session.last_activity_at == won.task.started_at == won.at
    assert await session_state(core, session_id) == "processing"

    await core.ledger.move_session(won, to_state(core, SessionState.ACTIVE))
    assert await core.ledger.claim(task.tenant_id, task.id, "w2", processing, session_id) is None
    assert await session_state(core, session_id) == "active"

    own = await new_session(core)
    other = await submit_in_session(core, own, max_attempts=1)
    claimed = await core.ledger.claim(other.tenant_id, other.id, "w1", processing, elsewhere)
    assert claimed is not None
    assert claimed.task.status == TaskStatus.RUNNING
    assert await session_state(core, elsewhere) == "active"
    if core.settings.database_url is None:  # SQLite: the second statement takes the row's
        assert claimed.session is not None
        assert claimed.session.id == own
    else:  # PostgreSQL: the joint statement moves the named session only if it is the task's
        assert claimed.session is None
        assert await session_state(core, own) == "active"
