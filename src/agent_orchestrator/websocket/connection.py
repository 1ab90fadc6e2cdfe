"""One open WebSocket: a bounded outbox drained by one sender task, its subscriptions
(members of the instance's stream hubs, fanout.py), and its close.

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

from agent_orchestrator.events.models import StreamKey
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.websocket.fanout import Member, StreamFanout
from agent_orchestrator.websocket.limits import MessageRateLimiter
from agent_orchestrator.websocket.metrics import CLOSED

_CLOSE = object()
#: How long a close may take to be written before the connection's task is cancelled.
#: Only reached on servers that cannot drop a peer that stopped reading (see server.py).
CLOSE_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    send_queue: int
    messages_per_second: float
    max_subscriptions: int


class Connection:
    __slots__ = (
        "_fanout",
        "_main",
        "_outbox",
        "_room",
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
        fanout: StreamFanout,
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
        self.subscriptions: dict[StreamKey, Member] = {}
        self._send = send
        self._fanout = fanout
        self._outbox: deque[Any] = deque()
        self._room: asyncio.Future[None] | None = None
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
        self._wake_waiters()
        self.close_code, self.close_reason = code, reason[:120]
        CLOSED.labels(str(code)).inc()
        self._queue_close_frame(drop_backlog=not flush)

    def _queue_close_frame(self, *, drop_backlog: bool) -> None:
        """Queue the close frame (first, when dropping what the client has not read) and
        arm the watchdog that forces it through if it is not sent in time."""
        if drop_backlog:
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
                if self._room is not None and len(self._outbox) < self.limits.send_queue // 2:
                    self._wake_waiters()
        except (OSError, RuntimeError):
            # The peer is gone (uvicorn raises ClientDisconnected, an OSError) or the socket
            # is already closed: nothing more can be written; the receive side ends it.
            self._outbox.clear()
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None

    def _force(self) -> None:
        """The close is overdue. First drop what the client is not reading so the close
        frame goes now (our server protocol then drops a peer that stopped reading); if
        even that does not end the socket, cancel its task."""
        self._watchdog = None
        if self._main is None or self._main.done():
            return
        if self._outbox or self._sender is not None:
            self._queue_close_frame(drop_backlog=True)
            return
        self.forced = True
        self._main.cancel()

    async def wait_for_room(self) -> None:
        """For producers that can wait (a log being replayed): until the outbox is at most
        half full, or the socket is closing."""
        while not self.closing and len(self._outbox) >= self.limits.send_queue // 2:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    def _wake_waiters(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    # --- subscriptions --------------------------------------------------------------------
    async def subscribe(
        self,
        key: StreamKey,
        *,
        after: int | None,
        replay: bool,
        ack: str | None,
        until_terminal: bool,
    ) -> None:
        """Replace any subscription to `key` with one from `after` (or from the start of
        the log when `replay`); `ack` is queued once registered, before any event."""
        await self._fanout.join(
            self, key, after=after, replay=replay, until_terminal=until_terminal, ack=ack
        )

    def unsubscribe(self, key: StreamKey) -> bool:
        return self._fanout.leave(self, key)

    # --- the end --------------------------------------------------------------------------
    async def teardown(self) -> None:
        """Runs on every exit path: every task of this socket ends, every subscription is
        left (a hub left empty leaves the bus), nothing stays queued."""
        self.closing = True
        self._wake_waiters()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        ending = self._fanout.leave_all(self)
        if self._sender is not None:
            self._sender.cancel()
            ending.append(self._sender)
            self._sender = None
        self._outbox.clear()
        if ending:
            await asyncio.wait(ending, timeout=CLOSE_GRACE)
