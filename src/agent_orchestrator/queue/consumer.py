"""Consumer: takes deliveries off the queue and runs them under a database lease.

For each delivery the runner claims the task (a conditional update exactly one worker can
win), starts the handler as its own asyncio task, renews the lease while it runs, and
ends the attempt in exactly one way: succeeded, failed, retried later, timed out,
cancelled (on request, from any API instance), released (on shutdown) or abandoned
(the lease was lost, so another worker owns the task now).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import tenacity
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.aio import cancel_and_wait
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.events.bus import EventBus, Handover, KeyWrite
from agent_orchestrator.events.models import Event
from agent_orchestrator.models.task import TaskErrorInfo, TaskStatus
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import TASK_DURATION
from agent_orchestrator.queue.base import Delivery, Received, TaskQueue
from agent_orchestrator.queue.registry import (
    ClaimFollowUp,
    HandlerRegistry,
    SessionOnClaim,
    TaskFailure,
    TaskKind,
)
from agent_orchestrator.services.task_ledger import Claim, Renewal, TaskLedger
from agent_orchestrator.services.task_views import status_event

log = get_logger(__name__)

#: Seconds a progress change waits for an event of its task to travel with (see
#: `TaskContext.progress`).
PROGRESS_DELAY = 0.02


@dataclass
class TaskContext:
    """What a handler gets: its task, the attempt, and ways to report progress and events."""

    task: TaskRow
    worker_id: str
    ledger: TaskLedger
    bus: EventBus
    db_factory: async_sessionmaker[AsyncSession]
    services: dict[str, Any] = field(default_factory=dict)
    #: The `running` event, published while the handler already starts; anything the
    #: handler announces waits for it, so the stream keeps its order.
    announced: asyncio.Future[None] | None = None
    #: Set by a handler as it writes its task's end itself (`ledger.finishing`): the
    #: lease is no longer renewed (the task is about to leave `running`, and a renewal
    #: would then find it "lost" and stop the handler in the middle of its last publishes).
    ended: bool = field(default=False, init=False)
    #: Set while a progress change waits to be announced (see `progress`).
    _progress_due: asyncio.TimerHandle | None = field(default=None, init=False)
    _announcing: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    @property
    def attempt(self) -> int:
        return self.task.attempt

    async def progress(self, steps_completed: int, steps_total: int, **extra: Any) -> None:
        """Written to the ledger with the next lease renewal and with the final state (a
        write per step would double a turn's cost), and announced as a `task.status` event
        together with the next event this task publishes, or PROGRESS_DELAY after the
        change if none comes first.

        Progress is a state, not a log: changes within that time share one event (a
        plan's parallel steps, a step and the reply chunk after it), and it travels in the
        same publish as the event that follows (each publish is a Redis round trip, and
        each event a message to every API instance). It is always out before the
        attempt's terminal event."""
        self.task.progress = {
            "steps_completed": steps_completed,
            "steps_total": steps_total,
            **extra,
        }
        if self._progress_due is None:
            loop = asyncio.get_running_loop()
            self._progress_due = loop.call_later(PROGRESS_DELAY, self._announce_progress)

    def _announce_progress(self) -> None:
        task = asyncio.ensure_future(self._publish_pending())
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _publish_pending(self) -> None:
        try:
            await self.publish([])
        except Exception as error:  # the next progress event, or the terminal one, says it
            log.warning("could not announce progress", error=str(error))

    async def settle(self) -> None:
        """Announces a progress change still waiting: before the attempt's end is recorded."""
        if self._progress_due is not None:
            await self._publish_pending()
        if self._announcing:
            await asyncio.wait(self._announcing)

    async def emit(self, event_type: str, data: dict[str, Any]) -> Event:
        return (await self.publish([self.event(event_type, data)]))[-1]

    def event(self, event_type: str, data: dict[str, Any]) -> Event:
        """An event of this task (and its session), to `emit` or `publish` with others."""
        return Event(
            type=event_type,
            tenant_id=self.task.tenant_id,
            session_id=str(self.task.session_id) if self.task.session_id else None,
            task_id=str(self.task.id),
            data=data,
        )

    async def publish(
        self,
        events: list[Event],
        handover: Handover | None = None,
        writes: Sequence[KeyWrite] = (),
    ) -> list[Event]:
        """Events published together (one round trip on Redis), in order, after `running`
        and after the progress change waiting, if any; `writes` are set before them."""
        await self._after_announced()
        pending = []
        if self._progress_due is not None:
            self._progress_due.cancel()
            self._progress_due = None
            pending.append(status_event(self.task))
        if not pending and not events and not writes:
            return []
        published = await self.bus.publish_many(pending + events, handover, writes)
        return published[len(pending) :]

    async def _after_announced(self) -> None:
        # Shielded: the future is shared by every step of the handler, and a waiter that
        # is cancelled (a plan cancels its other steps when a required one fails) would
        # otherwise cancel the announcement itself, and the runner awaiting it after
        # the handler would skip recording the attempt's end.
        if self.announced is not None:
            await asyncio.shield(self.announced)


#: How often a stopped handler that is still running is cancelled again.
RECANCEL_EVERY = 0.2
#: Tries at writing an attempt's end, and the first wait between them (then doubling):
#: 0.25 + 0.5 + 1 s, well within the lease's time at its default.
RECORD_TRIES = 4
RECORD_FIRST_WAIT = 0.25


def _record_failed(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("could not record the attempt's end; trying again", error=str(error))


class _Attempt:
    """A running handler and why it was stopped, if it was."""

    def __init__(self, work: asyncio.Task[Any]) -> None:
        self.work = work
        self.reason: str | None = None
        self._insisting: asyncio.Task[None] | None = None

    def stop(self, reason: str) -> None:
        if self.work.done():  # it ended first: its own end is what happened
            return
        if self.reason is None:
            self.reason = reason
        self.work.cancel()
        if self._insisting is None and not self.work.done():
            self._insisting = asyncio.create_task(
                self._insist(), name=f"{self.work.get_name()}-stop"
            )

    async def _insist(self) -> None:
        # One cancel is not always enough: redis-py swallows a CancelledError that lands
        # while a command is in flight (about a third of such cancels here), and the
        # handler then runs on to its end, side effects included. Cancel until it stops.
        while not self.work.done():
            await asyncio.wait({self.work}, timeout=RECANCEL_EVERY)
            if not self.work.done():
                self.work.cancel()


class TaskRunner:
    def __init__(
        self,
        *,
        ledger: TaskLedger,
        registry: HandlerRegistry,
        bus: EventBus,
        db_factory: async_sessionmaker[AsyncSession],
        worker_id: str,
        task_timeout: float,
        lease_ttl: float,
        backoff_initial: float,
        backoff_max: float,
        services: dict[str, Any] | None = None,
    ) -> None:
        self.ledger = ledger
        self.registry = registry
        self.bus = bus
        self.db_factory = db_factory
        self.worker_id = worker_id
        self.task_timeout = task_timeout
        self.lease_ttl = lease_ttl
        self.renew_every = lease_ttl / 3
        self.services = services or {}
        # Jitter in proportion to the first delay: with tenacity's default of 1 s, a
        # 50 ms backoff would wait up to twenty times longer than asked.
        self._backoff = tenacity.wait_exponential_jitter(
            multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial
        )
        self._attempts: dict[uuid.UUID, _Attempt] = {}
        bus.on_control(self._on_control)

    @property
    def running(self) -> int:
        return len(self._attempts)

    def stop_all(self, reason: str) -> None:
        for attempt in list(self._attempts.values()):
            attempt.stop(reason)

    async def _on_control(self, message: dict[str, Any]) -> None:
        if message.get("action") != "cancel":
            return
        try:
            task_id = uuid.UUID(str(message.get("task_id")))
        except ValueError:
            return
        attempt = self._attempts.get(task_id)
        if attempt is not None:
            attempt.stop("cancel")

    async def run(self, received: Received) -> None:
        delivery = received.delivery
        claim = await self._claim(delivery)
        if claim is None:
            log.debug("delivery dropped: task not claimable", task_id=delivery.task_id)
            return
        task = claim.task
        with structlog.contextvars.bound_contextvars(
            task_id=str(task.id),
            tenant_id=task.tenant_id,
            session_id=str(task.session_id) if task.session_id else None,
            attempt=task.attempt,
            correlation_id=task.input.get("correlation_id"),
        ):
            await self._run_claimed(task, received, self._follow_up(claim))

    async def _claim(self, delivery: Delivery) -> Claim | None:
        """The claim, with the session's change of the task's kind in the same statement
        when the delivery names kind and session; one queued by an earlier version
        names neither, so its kind's change follows once the row is known."""
        task_id = uuid.UUID(delivery.task_id)
        if delivery.kind is None:
            claim = await self.ledger.claim(delivery.tenant_id, task_id, self.worker_id)
            on_claimed = None if claim is None else self._on_claimed(claim.task.kind)
            if claim is None or on_claimed is None:
                return claim
            return await self.ledger.move_session(claim, on_claimed.move)
        on_claimed = self._on_claimed(delivery.kind)
        return await self.ledger.claim(
            delivery.tenant_id,
            task_id,
            self.worker_id,
            None if on_claimed is None else on_claimed.move,
            None if delivery.session_id is None else uuid.UUID(delivery.session_id),
        )

    def _on_claimed(self, kind_name: str) -> SessionOnClaim | None:
        kind = self.registry.get(kind_name)
        return None if kind is None else kind.on_claimed

    def _follow_up(self, claim: Claim) -> ClaimFollowUp | None:
        on_claimed = self._on_claimed(claim.task.kind)
        if on_claimed is None or claim.session is None:
            return None
        return on_claimed.moved(claim.task, claim.session, claim.at)

    async def _run_claimed(
        self, task: TaskRow, received: Received, after: ClaimFollowUp | None
    ) -> None:
        # Start the handler without waiting for the `running` event to be written: that
        # round trip was a third of the enqueue-to-start latency (bench/RESULTS.md).
        announced = asyncio.ensure_future(self._announce(task, after))
        try:
            await self._run_announced(task, received, announced)
        finally:
            await announced

    async def _announce(self, task: TaskRow, after: ClaimFollowUp | None) -> None:
        # Never raises: the handler's events and the runner's record wait for this
        # future, and a lost `running` or session event (Redis away) must not keep the
        # attempt from being recorded; the ledger holds the state either way.
        events = [self.ledger.announcement(task)]
        writes: list[KeyWrite] = []
        if after is not None:
            try:
                more, writes = await after()
                events += more
            except Exception as error:  # the task's own `running` goes out all the same
                log.warning("claim follow-up failed", error=str(error))
        try:
            await self.bus.publish_many(events, writes=writes)
        except Exception as error:
            log.warning("could not announce the claimed task", error=str(error))

    async def _run_announced(
        self, task: TaskRow, received: Received, announced: asyncio.Future[None]
    ) -> None:
        kind = self.registry.get(task.kind)
        if kind is None:
            await announced
            error = TaskErrorInfo(
                code="unknown_task_kind", message=f"no handler for task kind {task.kind!r}"
            )
            await self.ledger.finish(task, self.worker_id, TaskStatus.FAILED, error=error)
            return
        context = TaskContext(
            task,
            self.worker_id,
            self.ledger,
            self.bus,
            self.db_factory,
            self.services,
            announced,
        )
        started = time.perf_counter()
        attempt = _Attempt(asyncio.create_task(kind.handler(context), name=f"task-{task.id}"))
        self._attempts[task.id] = attempt
        keeper = asyncio.create_task(self._keep_lease(context, attempt, received))
        try:
            await asyncio.wait({attempt.work}, timeout=self.task_timeout)
            if not attempt.work.done():
                attempt.stop("timeout")
                await asyncio.wait({attempt.work})
        finally:
            # Not a bare cancel(): the keeper is often inside a Redis call, where redis-py
            # may swallow the cancellation; the keeper would then renew the lease forever
            # and this attempt would never record its end.
            await cancel_and_wait(keeper)
            if self._attempts.get(task.id) is attempt:  # a later attempt may hold the id now
                del self._attempts[task.id]
            TASK_DURATION.labels(task.kind).observe(time.perf_counter() - started)
        try:
            await announced  # the terminal event must follow `running`
            await context.settle()  # and the last progress
            # Tried again through a database blip: given up, a finished result would be
            # thrown away (the lease runs out and the task runs again, or fails on its last
            # attempt). Each write is guarded by the attempt's lease, so a try that did
            # commit makes the next one find nothing to do.
            async for trying in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(RECORD_TRIES),
                wait=tenacity.wait_exponential(multiplier=RECORD_FIRST_WAIT),
                before_sleep=_record_failed,
                reraise=True,
            ):
                with trying:
                    await self._record(task, attempt)
        finally:
            # Even when recording failed (the database or Redis away): the session must
            # not stay busy for want of its hook.
            if attempt.reason not in ("shutdown", "lease_lost"):
                await self._settle(kind, task)

    async def _settle(self, kind: TaskKind, task: TaskRow) -> None:
        try:
            if kind.on_settled is not None:
                await kind.on_settled(task)
            elif task.session_id is not None:
                # The claim lets a session's tasks run one at a time, so deliveries of its
                # next task were dropped while this one ran: hand it a fresh one now (a kind
                # with its own hook, like chat, does this there).
                await self.ledger.wake_next_in_session(task.tenant_id, task.session_id)
        except Exception:
            log.exception("settled hook failed")

    async def _record(self, task: TaskRow, attempt: _Attempt) -> None:
        work, owner = attempt.work, self.worker_id
        if work.cancelled() or attempt.reason is not None:
            reason = attempt.reason or "cancel"
            if reason == "cancel":
                await self.ledger.finish(task, owner, TaskStatus.CANCELLED)
            elif reason == "timeout":
                error = TaskErrorInfo(
                    code="timeout",
                    message=f"the task ran longer than TASK_TIMEOUT ({self.task_timeout:g} s)",
                )
                await self.ledger.finish(task, owner, TaskStatus.TIMED_OUT, error=error)
            elif reason == "shutdown":
                await self.ledger.release(task, owner)
            # "lease_lost": another worker owns the task now; write nothing.
            log.info("attempt stopped", reason=reason)
            return
        failure = work.exception()
        if failure is None:
            result = work.result()
            if result is not _ALREADY_FINISHED:
                await self.ledger.finish(task, owner, TaskStatus.SUCCEEDED, result=result)
            return
        if isinstance(failure, TaskFailure):
            error = TaskErrorInfo(
                code=failure.code, message=failure.message, retryable=failure.retryable
            )
        else:
            log.error("handler raised", error_type=type(failure).__name__, exc_info=failure)
            error = TaskErrorInfo(code="internal_error", message="the task handler failed")
        if error.retryable and task.attempt < task.max_attempts:
            delay = self.retry_delay(task.attempt)
            log.info("retrying later", code=error.code, delay=round(delay, 3))
            await self.ledger.retry_later(task, owner, error, delay)
        else:
            await self.ledger.finish(task, owner, TaskStatus.FAILED, error=error)

    def retry_delay(self, attempt: int) -> float:
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return float(self._backoff(state))

    async def _keep_lease(
        self, context: TaskContext, attempt: _Attempt, received: Received
    ) -> None:
        task = context.task
        renewed = time.monotonic()  # the claim took the lease
        while True:
            await asyncio.sleep(self.renew_every)
            if attempt.work.done() or context.ended:
                return
            try:
                renewal = await self.ledger.renew(task, self.worker_id)
            except Exception as error:  # the database may be briefly away: keep trying
                log.warning("lease renewal failed", error=str(error))
                # Until the lease may have run out: a reconciler may then give the task
                # to another attempt, and this one must not run on beside it.
                if time.monotonic() - renewed >= self.lease_ttl - self.renew_every:
                    log.warning("lease not renewed in time; abandoning the attempt")
                    attempt.stop("lease_lost")
                    return
                continue
            renewed = time.monotonic()
            try:  # SAQ's own bookkeeping: its failure must not hide what the renewal said
                await received.heartbeat()
            except Exception as error:
                log.warning("queue heartbeat failed", error=str(error))
            if context.ended:  # it wrote its end while this renewal was under way
                return
            if renewal is Renewal.LOST:
                log.warning("lease lost; abandoning the attempt")
                attempt.stop("lease_lost")
                return
            if renewal is Renewal.CANCEL:
                attempt.stop("cancel")
                return


#: A handler that wrote its terminal state itself (with its own final writes, via
#: `ledger.finishing`) returns this so the runner does not write it again.
_ALREADY_FINISHED: Any = object()
ALREADY_FINISHED = _ALREADY_FINISHED


#: How long one receive waits for a delivery. Short, so shutdown never waits on it long;
#: an idle worker makes a few cheap blocking calls a second per queue.
RECEIVE_WAIT = 0.25
#: How often delayed deliveries are checked for being due.
PROMOTE_EVERY = 0.2
#: Receive calls in flight per queue. One at a time, a receive (three Redis round trips)
#: waited its turn on a busy event loop: at 16 concurrent chat turns a delivery sat ~60 ms
#: in Redis (p50) before a worker with free slots took it.
RECEIVERS = 4


class WorkerPool:
    """Pulls deliveries from each queue with a bounded number of attempts in flight per
    queue (interactive work never waits behind bulk work), and drains on shutdown."""

    def __init__(self, queue: TaskQueue, runner: TaskRunner, concurrency: dict[str, int]) -> None:
        self.queue = queue
        self.runner = runner
        self.concurrency = concurrency
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for name, slots in self.concurrency.items():
            free = asyncio.Semaphore(slots)
            for receiver in range(min(RECEIVERS, slots)):
                loop = self._consume(name, free)
                self._loops.append(asyncio.create_task(loop, name=f"pool-{name}-{receiver}"))
        self._loops.append(asyncio.create_task(self._promote_due(), name="pool-promote"))

    async def _promote_due(self) -> None:
        """Move delayed deliveries (retry backoff) onto their queue once they are due."""
        while not self._stopping:
            try:
                await self.queue.promote_due()
            except Exception as error:
                log.warning("promoting delayed deliveries failed", error=str(error))
            await asyncio.sleep(PROMOTE_EVERY)

    async def _consume(self, name: str, free: asyncio.Semaphore) -> None:
        """One receiver of queue `name`; its receivers share the queue's free slots."""
        while not self._stopping:
            await free.acquire()
            try:
                received = await self.queue.receive(name, wait_seconds=RECEIVE_WAIT)
            except Exception as error:
                free.release()
                log.warning("queue receive failed", queue=name, error=str(error))
                await asyncio.sleep(1.0)
                continue
            if received is None:
                free.release()
                continue
            if self._stopping:  # arrived during shutdown: hand it straight back
                free.release()
                await received.done()
                await self.queue.enqueue(received.delivery)
                break
            job = asyncio.create_task(self._handle(received, free))
            self._inflight.add(job)
            job.add_done_callback(self._inflight.discard)

    async def _handle(self, received: Received, free: asyncio.Semaphore) -> None:
        try:
            await self.runner.run(received)
        except Exception:
            log.exception("delivery failed", task_id=received.delivery.task_id)
        finally:
            free.release()
            try:
                await received.done()
            except Exception as error:
                log.warning("could not acknowledge delivery", error=str(error))

    async def stop(self, grace: float) -> None:
        """Stop taking work, let running attempts finish within `grace`, then release the
        rest back to the queue (their attempt is not counted)."""
        self._stopping = True
        # A loop is either waiting for a free slot or in a short receive.
        if self._loops:
            await asyncio.wait(self._loops, timeout=RECEIVE_WAIT * 2)
        for loop in self._loops:
            await cancel_and_wait(loop)
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
        if self._inflight:
            self.runner.stop_all("shutdown")
            await asyncio.wait(set(self._inflight), timeout=10)
