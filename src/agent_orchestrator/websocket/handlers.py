"""What each authenticated client message does. The same services as the REST routes:
`chat.send` is `ChatOrchestrator.submit` in its own unit of work (the task is enqueued by
the commit's after-commit hook, exactly as `POST /api/v1/chat`), `chat.cancel` is
`TaskLedger.request_cancel`, and a subscription is allowed only to what
`SessionManager.get` / `TaskLedger.load_visible` let the caller see: another tenant's id
is `not_found`, never `forbidden`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.errors import Forbidden, ServiceError
from agent_orchestrator.events.models import StreamKey
from agent_orchestrator.models.principal import Principal, Scope
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.services.orchestrator import CHAT_KIND
from agent_orchestrator.state import AppState
from agent_orchestrator.websocket.connection import Connection
from agent_orchestrator.websocket.events import (
    ChatCancel,
    ChatSend,
    ClientMessage,
    Ping,
    Subscribe,
    Unsubscribe,
    ack_message,
    envelope,
    error_message,
)

log = get_logger(__name__)


def _require(principal: Principal, scope: Scope) -> None:
    if not principal.has_scope(scope):
        raise Forbidden(f"this operation needs the {scope.value!r} scope", details={"scope": scope})


def _target(message: Subscribe | Unsubscribe, tenant_id: str) -> StreamKey:
    if message.session_id is not None:
        return StreamKey("session", tenant_id, str(message.session_id))
    if message.batch_id is not None:
        return StreamKey("batch", tenant_id, str(message.batch_id))
    return StreamKey("task", tenant_id, str(message.task_id))


def _named(key: StreamKey) -> dict[str, str | None]:
    """How an ack names the stream: in the envelope's `session_id` or `task_id`, or, for
    a batch (which the envelope has no field for), as `batch_id` in its data."""
    if key.kind == "batch":
        return {"batch_id": key.resource_id}
    return {f"{key.kind}_id": key.resource_id}


#: The scope a subscription to each kind of stream needs.
_READ_SCOPE = {"session": Scope.SESSIONS_READ, "task": Scope.TASKS_READ, "batch": Scope.BATCH_READ}


def end_unpermitted_subscriptions(conn: Connection, principal: Principal) -> None:
    """After the socket's token changed (a refreshed token, or the Identity Service's new
    answer about it): each subscription whose scope the new principal lacks ends, told
    with a `system.error` `forbidden` that names the stream and the scope."""
    for key in list(conn.subscriptions):
        scope = _READ_SCOPE[key.kind]
        if not principal.has_scope(scope) and conn.unsubscribe(key):
            conn.send(
                error_message(
                    "forbidden",
                    f"subscription ended: the token no longer has the {scope.value!r} scope",
                    tenant_id=principal.tenant_id,
                    details={**_named(key), "scope": scope.value},
                )
            )


class MessageHandlers:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self._table: dict[str, Callable[[Connection, Principal, Any], Awaitable[None]]] = {
            "chat.send": self.chat_send,
            "chat.cancel": self.chat_cancel,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "system.ping": self.ping,
        }

    async def handle(self, conn: Connection, message: ClientMessage) -> None:
        """Answer one message; whatever fails becomes a `system.error`, the socket stays."""
        principal = conn.principal
        assert principal is not None
        try:
            await self._table[message.type](conn, principal, message)
        except ServiceError as error:
            conn.send(
                error_message(
                    error.code,
                    error.message,
                    tenant_id=principal.tenant_id,
                    request_id=message.request_id,
                    details=error.details,
                )
            )
        except Exception:
            log.exception("websocket message failed", type=message.type)
            conn.send(
                error_message(
                    "internal_error",
                    "the server failed to handle this message",
                    tenant_id=principal.tenant_id,
                    request_id=message.request_id,
                )
            )

    async def chat_send(self, conn: Connection, principal: Principal, message: ChatSend) -> None:
        _require(principal, Scope.CHAT_WRITE)
        # A turn sent here counts against the same limits as `POST /api/v1/chat`.
        limiter = self.state.limiter
        if limiter is not None:
            decision = await limiter.check(principal, conn.ip)
            if decision is not None and not decision.allowed:
                raise decision.refusal()
        async with UnitOfWork(self.state.db_factory) as uow:
            submitted = await self.state.orchestrator.submit(
                uow, principal, message.to_request(), message.idempotency_key
            )
        # Committed, and the after-commit hook has enqueued the task.
        task = submitted.task
        session_id = str(task.session_id)
        session_key = StreamKey("session", principal.tenant_id, session_id)
        follow = message.subscribe and session_key not in conn.subscriptions
        if follow and len(conn.subscriptions) >= conn.limits.max_subscriptions:
            follow = False
        conn.send(
            ack_message(
                "chat.send",
                message.request_id,
                tenant_id=principal.tenant_id,
                session_id=session_id,
                task_id=str(task.id),
                status=task.status,
                created=submitted.created,
                subscribed=follow or session_key in conn.subscriptions,
            )
        )
        if follow:
            # From the task's first event: whatever it published before this line is in
            # its log, so nothing between the commit and now is missed.
            await conn.subscribe(
                StreamKey("task", principal.tenant_id, str(task.id)),
                after=None,
                replay=True,
                ack=None,
                until_terminal=True,
            )

    async def chat_cancel(
        self, conn: Connection, principal: Principal, message: ChatCancel
    ) -> None:
        _require(principal, Scope.CHAT_WRITE)
        async with UnitOfWork(self.state.db_factory) as uow:
            row = await self.state.ledger.request_cancel(
                uow, principal, message.task_id, kind=CHAT_KIND
            )
            status = row.status
        conn.send(
            ack_message(
                "chat.cancel",
                message.request_id,
                tenant_id=principal.tenant_id,
                task_id=str(message.task_id),
                status=status,
            )
        )

    async def subscribe(self, conn: Connection, principal: Principal, message: Subscribe) -> None:
        key = _target(message, principal.tenant_id)
        _require(principal, _READ_SCOPE[key.kind])
        if (
            key not in conn.subscriptions
            and len(conn.subscriptions) >= conn.limits.max_subscriptions
        ):
            conn.send(
                error_message(
                    "too_many_subscriptions",
                    f"at most {conn.limits.max_subscriptions} subscriptions per connection",
                    tenant_id=principal.tenant_id,
                    request_id=message.request_id,
                )
            )
            return
        async with UnitOfWork(self.state.db_factory) as uow:
            if message.session_id is not None:
                await self.state.sessions.get(uow, principal, message.session_id)
            elif message.batch_id is not None:
                await self.state.batches.load_visible(uow.session, principal, message.batch_id)
            else:
                assert message.task_id is not None
                await self.state.ledger.load_visible(uow.session, principal, message.task_id)
        after = int(message.after) if message.after is not None else None
        ack = ack_message(
            "subscribe",
            message.request_id,
            tenant_id=principal.tenant_id,
            stream=key.kind,
            after=message.after,
            **_named(key),
        )
        # A task's log and a batch's are finite: without `after`, from their first event,
        # and the subscription ends with the last one (a terminal status, a final
        # progress). A session's is long-lived: without `after`, live events only.
        finite = key.kind in ("task", "batch")
        await conn.subscribe(
            key,
            after=after,
            replay=finite or after is not None,
            ack=ack,
            until_terminal=finite,
        )

    async def unsubscribe(
        self, conn: Connection, principal: Principal, message: Unsubscribe
    ) -> None:
        key = _target(message, principal.tenant_id)
        removed = conn.unsubscribe(key)
        conn.send(
            ack_message(
                "unsubscribe",
                message.request_id,
                tenant_id=principal.tenant_id,
                removed=removed,
                **_named(key),
            )
        )

    async def ping(self, conn: Connection, principal: Principal, message: Ping) -> None:
        conn.send(
            envelope(
                "system.pong", {"request_id": message.request_id}, tenant_id=principal.tenant_id
            )
        )
