"""The orchestrator: turns a chat request into a durable task and its plan.

Submission happens in one transaction: the task row (honouring `Idempotency-Key`), the
session when the request names none, and the user's message. The task is enqueued only
after that transaction commits. The plan a chat task runs is `chat_plan`: data, readable
in one place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import structlog

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.messages import MESSAGES
from agent_orchestrator.db.repositories.tasks import TaskRepository
from agent_orchestrator.db.tables import MessageRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import Conflict
from agent_orchestrator.ids import new_id
from agent_orchestrator.models.chat import BusyPolicy, ChatRequest
from agent_orchestrator.models.orchestration import (
    OrchestrationPlan,
    Ref,
    RetryPolicy,
    ServiceCall,
)
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.models.session import SessionCreate, ensure_editable
from agent_orchestrator.observability.metrics import CHAT_TURNS
from agent_orchestrator.observability.trace_context import trace_for_task
from agent_orchestrator.services.session_manager import SessionManager, may_see
from agent_orchestrator.services.task_ledger import Submission, TaskLedger
from agent_orchestrator.services.token_budget import TokenBudget

CHAT_KIND = "chat"
DEFAULT_AGENT = "default"


def user_message_id(task_id: uuid.UUID) -> uuid.UUID:
    """The user's message of a turn, derived from its task like the reply's, so the id we
    store and the id saved in a remote conversation service are the same."""
    return uuid.uuid5(task_id, "user-message")


def reply_message_id(task_id: uuid.UUID) -> uuid.UUID:
    """The assistant message's id is derived from its task: every attempt writes the
    same id, so saving it (here or downstream) is idempotent."""
    return uuid.uuid5(task_id, "assistant-reply")


def chat_plan(settings: Settings, *, remote_conversation: bool) -> OrchestrationPlan:
    """History and agent configuration in parallel; knowledge when the agent has some;
    then the streamed reply; then, when conversations live in their own service, the
    turn is saved there (our database keeps its own copy either way)."""
    retry = RetryPolicy(
        attempts=settings.step_retry_attempts,
        initial=settings.step_retry_initial,
        max_delay=min(5.0, settings.task_timeout / 4),
    )
    quick = settings.downstream_timeout
    steps = [
        ServiceCall(
            step="history",
            service="conversation",
            operation="get_history",
            inputs={"session_id": Ref("request.session_id"), "limit": Ref("request.history_limit")},
            timeout=quick,
            retry=retry,
            required=False,
        ),
        ServiceCall(
            step="agent",
            service="agent_management",
            operation="get_agent",
            inputs={"agent_id": Ref("request.agent_id")},
            timeout=quick,
            retry=retry,
        ),
        ServiceCall(
            step="knowledge",
            service="query",
            operation="search",
            inputs={
                "query": Ref("request.message"),
                "collection_ids": Ref("steps.agent.knowledge.collection_ids", []),
                "top_k": Ref("steps.agent.knowledge.top_k", 4),
            },
            depends_on=("agent",),
            when=Ref("steps.agent.knowledge"),
            timeout=quick,
            retry=retry,
            required=False,
        ),
        ServiceCall(
            step="generate",
            service="agent_execution",
            operation="execute",
            inputs={
                "agent": Ref("steps.agent"),
                "history": Ref("steps.history", []),
                "message": Ref("request.message"),
                "sources": Ref("steps.knowledge", []),
            },
            depends_on=("history", "agent", "knowledge"),
            timeout=settings.llm_timeout,
            retry=retry,
            stream=True,
        ),
    ]
    if remote_conversation:

        def save(step: str, message_id: str, role: str, content: Ref, after: str) -> ServiceCall:
            return ServiceCall(
                step=step,
                service="conversation",
                operation="save_message",
                inputs={
                    "session_id": Ref("request.session_id"),
                    "message_id": Ref(message_id),
                    "role": role,
                    "content": content,
                    "task_id": Ref("request.task_id"),
                    "metadata": {},
                },
                depends_on=(after,),
                timeout=quick,
                retry=retry,
                required=False,
            )

        steps += [
            save(
                "save_user_message",
                "request.user_message_id",
                "user",
                Ref("request.message"),
                after="generate",
            ),
            save(
                "save_reply",
                "request.reply_message_id",
                "assistant",
                Ref("steps.generate.content"),
                after="save_user_message",
            ),
        ]
    return OrchestrationPlan("chat", tuple(steps))


def turn_input(message: str, agent_id: str, mode: str) -> dict[str, Any]:
    """What a chat turn's task carries: its message and agent, and its request's context."""
    return {
        # The request's correlation id travels with the task, so the worker's logs and
        # every downstream call carry the id the client saw.
        "correlation_id": structlog.contextvars.get_contextvars().get("correlation_id"),
        # The client's trace (or a new one), for every attempt of the task.
        "traceparent": trace_for_task(),
        "message": message,
        "agent_id": agent_id,
        "mode": mode,
    }


def user_message(task: TaskRow, content: str, metadata: dict[str, Any]) -> MessageRow:
    """The user's message of a turn, stored with the turn's task."""
    assert task.session_id is not None
    return MESSAGES.new(
        id=user_message_id(task.id),
        session_id=task.session_id,
        tenant_id=task.tenant_id,
        role="user",
        content=content,
        task_id=task.id,
        metadata_=metadata,
        created_at=utcnow(),
    )


@dataclass
class Submitted:
    task: TaskRow
    created: bool


class ChatOrchestrator:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionManager,
        ledger: TaskLedger,
        budget: TokenBudget,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.ledger = ledger
        self.budget = budget

    async def submit(
        self,
        uow: UnitOfWork,
        principal: Principal,
        request: ChatRequest,
        idempotency_key: str | None,
    ) -> Submitted:
        if idempotency_key is not None:
            existing = await TaskRepository(uow.session).by_idempotency_key(
                principal.tenant_id, idempotency_key
            )
            if existing is not None:
                return Submitted(self._same_request(principal, existing, request), False)
        await self.budget.check(principal.tenant_id, "api")
        if request.session_id is not None:
            # Locked until the turn is committed: a close racing it either sees the turn
            # (and comes after it) or is seen (409), never closes around it.
            session = await self.sessions.read_truth(
                uow, principal, request.session_id, for_update=True
            )
            ensure_editable(session.state)
            session_id, agent_id = session.id, request.agent_id or session.agent_id
            await self._apply_busy_policy(uow, principal, session_id, request.on_busy)
        else:
            session_id, agent_id = new_id(), request.agent_id
        agent_id = agent_id or DEFAULT_AGENT
        task, created = await self.ledger.submit(
            uow,
            principal,
            Submission(
                kind=CHAT_KIND,
                queue=self.settings.queue_interactive,
                input=turn_input(request.message, agent_id, request.mode.value),
                session_id=session_id,
                idempotency_key=idempotency_key,
            ),
        )
        if not created:  # lost an idempotency race: nothing else was written
            return Submitted(self._same_request(principal, task, request), created=False)
        if request.session_id is None:
            await self.sessions.create(
                uow,
                principal,
                SessionCreate(agent_id=agent_id),
                session_id=session_id,
                hot_copy=False,  # the worker writes it as it claims the turn
            )
        # Its id is the new task's: no earlier attempt can have stored it.
        uow.insert_at_commit(MESSAGES, user_message(task, request.message, request.metadata))
        CHAT_TURNS.labels(request.mode.value).inc()
        return Submitted(task, created=True)

    @staticmethod
    def _same_request(principal: Principal, task: TaskRow, request: ChatRequest) -> TaskRow:
        """An Idempotency-Key answers with its first task only for a repeat of the same
        request by whoever made it; anything else is a conflict that reveals nothing."""
        if task.user_id != principal.user_id or task.input.get("message") != request.message:
            raise Conflict(
                "this Idempotency-Key was already used for a different request",
                details={"header": "Idempotency-Key"},
            )
        return task

    async def _apply_busy_policy(
        self,
        uow: UnitOfWork,
        principal: Principal,
        session_id: uuid.UUID,
        requested: BusyPolicy | None,
    ) -> None:
        policy = requested or BusyPolicy(self.settings.chat_busy_policy)
        if policy is BusyPolicy.ENQUEUE:
            return
        unfinished = await TaskRepository(uow.session).unfinished_in_session(
            principal.tenant_id, session_id
        )
        if not unfinished:
            return
        # A turn someone else sent into this session (an admin can) is neither shown to
        # the caller nor cancelled on their say: the session stays busy with it.
        visible = [task for task in unfinished if may_see(principal, task.user_id)]
        if policy is BusyPolicy.REJECT or len(visible) < len(unfinished):
            raise Conflict(
                "the session is still answering an earlier message",
                details={
                    "session_id": str(session_id),
                    "task_ids": [str(task.id) for task in visible],
                },
            )
        for task in visible:  # INTERRUPT
            try:
                await self.ledger.request_cancel(uow, principal, task.id)
            except Conflict:  # it ended since it was read: nothing left to interrupt
                continue
