"""One open WebSocket: a bounded outbox drained by one sender task, the subscriptions that
feed it, and its close.

Nothing that produces messages (the bus fan-out, the handlers) ever awaits the socket:
`send` appends to the outbox and returns. A client that stops reading makes its outbox
fill; it is then closed, and nobody else waited for it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from starlette.types import Send

from agent_orchestrator.events.bus import EventBus, SubscriberOverflow
from agent_orchestrator.events.models import Event, EventType, StreamKey
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.models.task import TERMINAL
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.websocket.events import EventEncoder, error_message
from agent_orchestrator.websocket.limits import MessageRateLimiter
from agent_orchestrator.websocket.metrics import CLOSED, SUBSCRIPTIONS

log = get_logger(__name__)

_CLOSE = object()
#: How long a close may take to be written before the connection's task is cancelled.
#: Only reached on servers that cannot drop a peer that stopped reading (see server.py).
CLOSE_GRACE = 5.0
_TERMINAL_VALUES = frozenset(status.value for status in TERMINAL)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    send_queue: int
    messages_per_second: float
    max_subscriptions: int


def ends_task_stream(event: Event) -> bool:
    return event.type == EventType.TASK_STATUS and event.data.get("status") in _TERMINAL_VALUES


class Connection:
    __slots__ = (
        "_bus",
        "_encoder",
        "_main",
        "_outbox",
        "_send",
        "_sender",
        "_watchdog",
        "close_code",
        "close_reason",
        "closing",
        "expires_at",
        "forced",
        "id",
        "ip",
        "last_activity",
        "limiter",
        "limits",
        "opened_at",
        "principal",
        "subscriptions",
    )

    def __init__(
        self,
        *,
        connection_id: str,
        ip: str,
        send: Send,
        bus: EventBus,
        encoder: EventEncoder,
        limits: ConnectionLimits,
    ) -> None:
        now = time.monotonic()
        self.id = connection_id
        self.ip = ip
        self.limits = limits
        self.principal: Principal | None = None
        self.expires_at: float | None = None
        self.opened_at = now
        self.last_activity = now
        self.limiter = MessageRateLimiter(limits.messages_per_second, now)
        self.closing = False
        self.close_code = 1000
        self.close_reason = ""
        self.forced = False
        self.subscriptions: dict[StreamKey, asyncio.Task[None]] = {}
        self._send = send
        self._bus = bus
        self._encoder = encoder
        self._outbox: deque[Any] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._main = asyncio.current_task()

    @property
    def tenant_id(self) -> str:
        return self.principal.tenant_id if self.principal else ""

    # --- writing --------------------------------------------------------------------------
    def send(self, text: str) -> bool:
        """Queue one message. False when the socket is closing, or when the outbox is full:
        then the client is not reading, and it is closed."""
        if self.closing:
            return False
        if len(self._outbox) >= self.limits.send_queue:
            self.close(1008, "send queue overflow: the client is not reading", flush=False)
            return False
        self._outbox.append(text)
        self._wake_sender()
        return True

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Close once: after what is queued (flush), or at once, dropping the backlog (a
        client that does not read, an idle or expired one)."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason[:120]
        CLOSED.labels(str(code)).inc()
        if not flush:
            self._outbox.clear()
            if self._sender is not None:
                # It is most likely waiting for the peer to read; the close goes first.
                self._sender.cancel()
                self._sender = None
        self._outbox.append(_CLOSE)
        self._wake_sender()
        self._watchdog = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._force)

    def _wake_sender(self) -> None:
        if self._sender is None:
            # Started on demand and ended when the outbox is empty: an idle socket holds
            # no sender task (memory per connection is the scaling limit).
            self._sender = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._outbox:
                item = self._outbox.popleft()
                if item is _CLOSE:
                    await self._send(
                        {
                            "type": "websocket.close",
                            "code": self.close_code,
                            "reason": self.close_reason,
                        }
                    )
                    return
                await self._send({"type": "websocket.send", "text": item})
                self.last_activity = time.monotonic()
        except (OSError, RuntimeError):
            # The peer is gone (uvicorn raises ClientDisconnected, an OSError) or the socket
            # is already closed: nothing more can be written; the receive side ends it.
            self._outbox.clear()
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None

    def _force(self) -> None:
        self._watchdog = None
        if self._main is not None and not self._main.done():
            self.forced = True
            self._main.cancel()

    # --- subscriptions --------------------------------------------------------------------
    def subscribe(
        self,
        key: StreamKey,
        *,
        after: int | None,
        replay: bool,
        ack: str | None,
        until_terminal: bool,
    ) -> None:
        """Replace any subscription to `key` with one from `after`; `ack` is queued once
        the subscription is registered, before any of its events."""
        self.unsubscribe(key)
        pump = self._pump(key, after, replay, ack, until_terminal)
        self.subscriptions[key] = asyncio.get_running_loop().create_task(pump)
        SUBSCRIPTIONS.inc()

    def unsubscribe(self, key: StreamKey) -> bool:
        task = self.subscriptions.pop(key, None)
        if task is None:
            return False
        SUBSCRIPTIONS.dec()
        task.cancel()
        return True

    async def _pump(
        self,
        key: StreamKey,
        cursor: int | None,
        replay: bool,
        ack: str | None,
        until_terminal: bool,
    ) -> None:
        try:
            while True:
                try:
                    async with self._bus.subscribe(
                        key, cursor, replay=replay, max_queue=self.limits.send_queue
                    ) as events:
                        if ack is not None:
                            self.send(ack)
                            ack = None
                        async for event in events:
                            cursor = event.cursor
                            if not self.send(self._encoder.encode(event)):
                                return
                            if until_terminal and ends_task_stream(event):
                                return
                    return
                except SubscriberOverflow:
                    # This process, not the client, fell behind the bus: read the log
                    # again from the last event sent. Nothing lost, nothing repeated.
                    replay = True
        except Exception as error:
            log.warning("websocket subscription lost", stream=key.kind, error=repr(error))
            self.send(
                error_message(
                    "subscription_lost",
                    f"the {key.kind} subscription stopped; subscribe again with 'after'",
                    tenant_id=self.tenant_id,
                    details={"after": str(cursor) if cursor is not None else None},
                    retryable=True,
                )
            )
        finally:
            if self.subscriptions.get(key) is asyncio.current_task():
                del self.subscriptions[key]
                SUBSCRIPTIONS.dec()

    # --- the end --------------------------------------------------------------------------
    async def teardown(self) -> None:
        """Runs on every exit path: every task of this socket ends, every subscription is
        left (the bus forgets its subscriber), nothing stays queued."""
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        tasks = list(self.subscriptions.values())
        for key in list(self.subscriptions):
            self.unsubscribe(key)
        if self._sender is not None:
            self._sender.cancel()
            tasks.append(self._sender)
            self._sender = None
        self._outbox.clear()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_GRACE)
