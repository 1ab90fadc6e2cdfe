"""Events other platform services publish to a session through `/internal/v1`: a
workflow's progress, a tool's result, a notice. They travel like the service's own
events (the session's log, and the task's when one is named; live to every subscriber
on any API instance) under types the service itself never uses."""

from __future__ import annotations

import uuid

from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.tasks import TaskRepository
from agent_orchestrator.errors import Conflict, NotFound
from agent_orchestrator.events.bus import EventBus
from agent_orchestrator.events.models import Event
from agent_orchestrator.models.internal import ServiceEvent, ServiceEventAccepted
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.services.once_keys import OnceKeys
from agent_orchestrator.services.session_manager import SessionManager


class ServiceEvents:
    def __init__(
        self, sessions: SessionManager, bus: EventBus, once: OnceKeys, *, ttl_seconds: int
    ) -> None:
        self.sessions = sessions
        self.bus = bus
        self.once = once
        self.ttl_seconds = ttl_seconds

    async def publish(
        self,
        uow: UnitOfWork,
        principal: Principal,
        session_id: uuid.UUID,
        body: ServiceEvent,
        idempotency_key: str | None,
    ) -> ServiceEventAccepted:
        """Publish `body` to the session (404 when the tenant has no such session, or the
        task is not one of its). A repeated `idempotency_key` within EVENTS_TTL, the time
        the event itself is kept, publishes nothing."""
        await self.sessions.get(uow, principal, session_id)
        if body.task_id is not None:
            task = await TaskRepository(uow.session).get(principal.tenant_id, body.task_id)
            if task is None or task.session_id != session_id:
                raise NotFound(
                    "task not found in this session", details={"task_id": str(body.task_id)}
                )
        key = None
        if idempotency_key is not None:
            # The tenant length-prefixed, as the rate limiter's keys: a tenant id may hold
            # ':', and must not make another tenant's key.
            tenant = principal.tenant_id
            key = f"event:{len(tenant)}:{tenant}:{session_id}:{idempotency_key}"
            if not await self.once.claim(key, self.ttl_seconds):
                first = await self.once.outcome(key)
                if first is None:  # it may yet fail: answering "done" could lose the event
                    raise Conflict(
                        "a request with this Idempotency-Key is still being handled; "
                        "send it again shortly",
                        details={"header": "Idempotency-Key"},
                    )
                return ServiceEventAccepted(id=first, duplicate=True)
        event = Event(
            type=body.type,
            tenant_id=principal.tenant_id,
            session_id=str(session_id),
            task_id=str(body.task_id) if body.task_id else None,
            data=body.data,
        )
        try:
            published = await self.bus.publish(event)
        except BaseException:
            if key is not None:  # not published: a retry must not be taken for a repeat
                await self.once.release(key)
            raise
        if key is not None:
            await self.once.record(key, published.id, self.ttl_seconds)
        return ServiceEventAccepted(id=published.id, duplicate=False)
