"""The chat task: run the chat plan, stream the reply, write it once, free the session.

The reply, the task's terminal status and the session's return to `active` are written
all or nothing (db/repositories/turn_end.py); the reply's id is derived from the task,
and messages allow one assistant reply per task, so however often the task runs
(retries, a worker killed mid-turn) the conversation holds one answer.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agent_orchestrator.clients.base import CallContext, DownstreamError
from agent_orchestrator.config import Settings
from agent_orchestrator.db.prepared import Bound
from agent_orchestrator.db.repositories.messages import MESSAGES
from agent_orchestrator.db.repositories.tasks import CALLS, TaskRepository
from agent_orchestrator.db.repositories.turn_end import end_turn
from agent_orchestrator.db.tables import MessageRow, ServiceCallRow, SessionRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.events.bus import EventBus, KeyWrite
from agent_orchestrator.events.models import Event, EventType
from agent_orchestrator.ids import new_id
from agent_orchestrator.models.agent import AgentConfig, ReplyChunk, Source
from agent_orchestrator.models.chat import ChatResponse
from agent_orchestrator.models.orchestration import StepOutcome
from agent_orchestrator.models.session import Session, SessionState
from agent_orchestrator.models.task import TaskStatus
from agent_orchestrator.observability.trace_context import continue_trace
from agent_orchestrator.observability.tracing import span_scope
from agent_orchestrator.queue.consumer import ALREADY_FINISHED, TaskContext
from agent_orchestrator.queue.registry import ClaimFollowUp, TaskFailure
from agent_orchestrator.services.orchestrator import (
    chat_plan,
    reply_message_id,
    user_message_id,
)
from agent_orchestrator.services.service_coordinator import (
    PlanFailed,
    PlanRun,
    ServiceCoordinator,
    StreamedReply,
)
from agent_orchestrator.services.session_manager import SessionManager, to_message, to_session
from agent_orchestrator.services.task_ledger import TaskLedger
from agent_orchestrator.services.task_views import to_view
from agent_orchestrator.services.token_budget import BudgetExceeded, TokenBudget


@dataclass
class ChatTurn:
    settings: Settings
    coordinator: ServiceCoordinator
    sessions: SessionManager
    ledger: TaskLedger
    bus: EventBus
    remote_conversation: bool
    budget: TokenBudget
    #: turns whose session went back to `active` with their end (turn_end.py): `settled`
    #: need not write it again. An id outlives its turn only when the worker stops
    #: between that commit and the hook (shutdown), which leaves a few bytes behind.
    _freed: set[uuid.UUID] = field(default_factory=set)
    #: the task kinds registered to run as turns (a chat turn, a batch item)
    kinds: set[str] = field(default_factory=set)

    async def run(self, ctx: TaskContext) -> Any:
        task = ctx.task
        stored = task.input.get("traceparent")
        attributes = {"task.id": str(task.id), "tenant.id": task.tenant_id}
        with span_scope("chat.turn", stored, attributes=attributes) as scope:
            return await self._run(ctx, scope.traceparent or continue_trace(stored))

    async def _run(self, ctx: TaskContext, traceparent: str) -> Any:
        task = ctx.task
        if task.session_id is None:
            raise TaskFailure("invalid_task", "a chat task needs a session")
        try:  # queued before the budget ran out: it stops here, before any call
            await self.budget.check(task.tenant_id, "worker")
        except BudgetExceeded as spent:
            raise TaskFailure(spent.code, spent.message) from spent
        started = time.perf_counter()
        degraded: list[dict[str, Any]] = []
        call_ctx = CallContext(
            tenant_id=task.tenant_id,
            correlation_id=task.input.get("correlation_id") or str(task.id),
            session_id=str(task.session_id),
            task_id=str(task.id),
            traceparent=traceparent,
        )

        async def on_chunk(chunk: ReplyChunk) -> None:
            await ctx.emit(EventType.CHAT_STREAM, {"chunk": chunk.content, "index": chunk.index})

        async def on_warning(outcome: StepOutcome) -> None:
            skipped = {"step": outcome.step, "service": outcome.service, **(outcome.error or {})}
            degraded.append(skipped)
            await ctx.emit(
                EventType.SYSTEM_WARNING,
                {
                    "code": "degraded",
                    "message": f"{outcome.step} was skipped: {skipped.get('message', '')}",
                    "step": outcome.step,
                    "service": outcome.service,
                    "error": outcome.error,
                },
            )

        steps: list[ServiceCallRow] = []

        async def on_step(outcome: StepOutcome, latency_ms: float) -> None:
            steps.append(_service_call(task, outcome))
            if outcome.step == "agent" and outcome.status == "succeeded":
                self._check_requirements(outcome)

        run = PlanRun(
            ctx=call_ctx,
            request={
                "session_id": str(task.session_id),
                "agent_id": task.input.get("agent_id", "default"),
                "message": task.input["message"],
                "history_limit": self.settings.history_limit,
                "task_id": str(task.id),
                "user_message_id": str(user_message_id(task.id)),
                "reply_message_id": str(reply_message_id(task.id)),
            },
            on_chunk=on_chunk,
            on_progress=lambda done, total: ctx.progress(done, total),
            on_warning=on_warning,
            on_step=on_step,
        )
        plan = chat_plan(self.settings, remote_conversation=self.remote_conversation)
        try:
            outcomes = await self.coordinator.run(plan, run)
        except PlanFailed as failure:
            await self.ledger.save_service_calls(task, steps)
            error = failure.error
            # Final for this turn: the coordinator already spent the step's retry budget
            # (STEP_RETRY_ATTEMPTS) on a retryable failure. Retrying the task would run the
            # whole plan again, multiplying the attempts a failing service receives.
            raise TaskFailure(
                error.code, f"{failure.outcome.step}: {error.message}", retryable=False
            ) from failure
        except BaseException:
            await self.ledger.save_service_calls(task, steps)  # cancelled: keep the record
            raise
        reply = outcomes["generate"].output
        assert isinstance(reply, StreamedReply)
        sources: list[Source] = outcomes["knowledge"].output or []
        await self._finish(ctx, reply, sources, degraded, steps, time.perf_counter() - started)
        return ALREADY_FINISHED

    async def _finish(
        self,
        ctx: TaskContext,
        reply: StreamedReply,
        sources: list[Source],
        degraded: list[dict[str, Any]],
        steps: list[ServiceCallRow],
        elapsed: float,
    ) -> None:
        task = ctx.task
        session_id = task.session_id
        assert session_id is not None  # checked by `run`
        message_id = reply_message_id(task.id)
        metadata = {
            "model": reply.model,
            "usage": reply.usage.model_dump(),
            "finish_reason": reply.finish_reason,
            "sources": [source.model_dump() for source in sources],
            "degraded": degraded,
            "latency_ms": round(elapsed * 1000, 2),
        }
        result = {
            "message_id": str(message_id),
            "content": reply.content,
            "usage": metadata["usage"],
            "degraded": degraded,
        }
        now = utcnow()
        # The lease keeper stands down from here: a renewal racing the end's commit would
        # find the task no longer `running`, take the lease for lost and stop this turn
        # in the middle of its last publishes.
        ctx.ended = True
        async with ctx.db_factory() as db:
            ended = await end_turn(
                db,
                task=self.ledger.finishing(
                    task, ctx.worker_id, TaskStatus.SUCCEEDED, result=result
                ),
                calls=steps,
                reply=MESSAGES.new(
                    id=message_id,
                    session_id=session_id,
                    tenant_id=task.tenant_id,
                    role="assistant",
                    content=reply.content,
                    task_id=task.id,
                    metadata_=metadata,
                    created_at=now,
                ),
                session=self.sessions.turn_mark(
                    task.tenant_id, session_id, SessionState.ACTIVE, now
                ),
            )
        if ended is None:  # the lease moved on: another worker owns this task now
            return
        await self.budget.charge(
            task.tenant_id, reply.usage.prompt_tokens, reply.usage.completion_tokens
        )
        row, stored = ended.task, ended.reply
        session = None if ended.session is None else to_session(ended.session, now)
        handover = None
        if stored is not None and task.attempt == 1 and task.input.get("mode") == "wait":
            # Exactly what a read-back would find: this attempt wrote every row of it
            # (a retried attempt may leave earlier steps' rows, or find its reply stored).
            # See services/turn_results.py.
            handover = (str(task.id), _finished(row, steps, stored).model_dump_json())
        completed = ctx.event(
            EventType.CHAT_COMPLETED,
            {
                "message_id": str(message_id),
                "content": reply.content,
                "sources": metadata["sources"],
                "usage": metadata["usage"],
                "latency_ms": metadata["latency_ms"],
                "degraded": degraded,
            },
        )
        # One publish for the turn's last events (a round trip each on Redis otherwise),
        # which sets the session's hot copy first.
        events = [completed, self.ledger.announcement(row)]
        writes: list[KeyWrite] = []
        if session is not None:
            self._freed.add(task.id)
            event, writes = await self._session_announcement(task, session)
            events.append(event)
        await ctx.publish(events, handover, writes)

    def processing(self, tenant_id: str, session_id: uuid.UUID, now: datetime) -> Bound:
        """The session is `processing` from the moment the turn holds it: sent with the
        claim (SessionOnClaim)."""
        return self.sessions.turn_mark(tenant_id, session_id, SessionState.PROCESSING, now)

    def claimed(self, task: TaskRow, row: SessionRow, now: datetime) -> ClaimFollowUp:
        """What follows `running` once the claim moved the session."""
        session = to_session(row, now)

        async def announce() -> tuple[list[Event], list[KeyWrite]]:
            event, writes = await self._session_announcement(task, session)
            return [event], writes

        return announce

    async def settled(self, task: TaskRow) -> None:
        """Whatever the outcome: the session is free again, and its next turn may run."""
        if task.session_id is None:
            return
        if task.id in self._freed:
            self._freed.discard(task.id)
        else:
            await self._mark_session(task, SessionState.ACTIVE)
        await self.ledger.wake_next_in_session(task.tenant_id, task.session_id)

    async def ended_elsewhere(self, task: TaskRow) -> None:
        """A turn ended outside its worker's attempt (the reconciler failed or cancelled
        it, a flagged turn given back on shutdown): no settled hook ran, so its session
        may still say `processing`. Freed unless another of its turns runs (the ledger
        wakes the next one itself)."""
        if task.session_id is None or task.kind not in self.kinds:
            return
        async with self.ledger.factory() as db:
            unfinished = await TaskRepository(db).unfinished_in_session(
                task.tenant_id, task.session_id
            )
        if not any(other.status == TaskStatus.RUNNING for other in unfinished):
            await self._mark_session(task, SessionState.ACTIVE)

    async def _mark_session(self, task: TaskRow, target: SessionState) -> None:
        assert task.session_id is not None
        async with self.ledger.factory() as db:
            session = await self.sessions.mark_turn(db, task.tenant_id, task.session_id, target)
            await db.commit()
        if session is not None:
            await self._announce_session(task, session)

    async def _announce_session(self, task: TaskRow, session: Session) -> None:
        event, writes = await self._session_announcement(task, session)
        await self.bus.publish_many([event], writes=writes)

    async def _session_announcement(
        self, task: TaskRow, session: Session
    ) -> tuple[Event, list[KeyWrite]]:
        """The session's new state as an event to publish, and its hot copy for the same
        publish to write first (or written already): a client that sees the event reads
        the same state."""
        write = await self.sessions.hot_copy_write(session)
        event = Event(
            type=EventType.SESSION_STATE,
            tenant_id=task.tenant_id,
            session_id=str(task.session_id),
            data={"state": session.state.value, "task_id": str(task.id)},
        )
        return event, [] if write is None else [write]

    def _check_requirements(self, outcome: StepOutcome) -> None:
        agent = outcome.output
        if not isinstance(agent, AgentConfig):
            return
        missing = [name for name in agent.requires if not self.coordinator.available(name)]
        if missing:
            error = DownstreamError(
                missing[0],
                "service_unavailable",
                f"agent {agent.id!r} requires {', '.join(missing)}, which is not configured",
                retryable=False,
            )
            raise PlanFailed(outcome, error)


def _service_call(task: TaskRow, outcome: StepOutcome) -> ServiceCallRow:
    now = utcnow()
    return CALLS.new(
        id=new_id(),
        task_id=task.id,
        tenant_id=task.tenant_id,
        step=outcome.step,
        service=outcome.service,
        operation=outcome.operation,
        status=outcome.status,
        attempts=outcome.attempts,
        latency_ms=outcome.latency_ms,
        error=outcome.error,
        started_at=now - timedelta(milliseconds=outcome.latency_ms or 0),
        finished_at=now,
    )


def _finished(task: TaskRow, steps: list[ServiceCallRow], reply: MessageRow) -> ChatResponse:
    """The `mode=wait` answer from the rows the turn's end wrote, in the order and
    shape of `TaskLedger.view` and the reply lookup."""
    calls = sorted(steps, key=lambda call: (call.started_at, call.step))
    return ChatResponse(task=to_view(task, calls), message=to_message(reply))
