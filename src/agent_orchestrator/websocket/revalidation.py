"""Sockets whose token was introspected (middleware/auth.py, `Introspector`) are asked
about again once their answer is `IDENTITY_CACHE_SECONDS` old: a token the Identity
Service no longer holds active (a logout, a revocation, a suspended tenant) closes its
socket with 1008, as an expired token does; an answer with fewer scopes ends the
subscriptions that needed them (handlers.end_unpermitted_subscriptions). So a revocation
reaches an open socket within about that long (reliability S6). A JWT of ours needs none
of this: its `exp` is the whole story, and the connection manager closes the socket at it.

An Identity Service that cannot answer leaves the socket open (the token may be good),
and is asked again at the next round. The questions go without the client's address:
the server asks them, not the client, so they take nothing of its introspection bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from agent_orchestrator.errors import RateLimited, ServiceUnavailable, Unauthorized
from agent_orchestrator.middleware.auth import Introspector
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.websocket.connection import Connection
from agent_orchestrator.websocket.handlers import end_unpermitted_subscriptions

log = get_logger(__name__)


class Revalidation:
    def __init__(self, introspector: Introspector) -> None:
        self.introspector = introspector
        self.every = introspector.cache_seconds
        #: connection id -> (socket, token, when to ask again on the monotonic clock)
        self._watched: dict[str, tuple[Connection, str, float]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, conn: Connection, token: str) -> None:
        self._watched[conn.id] = (conn, token, time.monotonic() + self.every)

    def forget(self, conn: Connection) -> None:
        self._watched.pop(conn.id, None)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._forever(), name="websocket-revalidation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.every / 4))
            await self.round(time.monotonic())

    async def round(self, now: float) -> None:
        due = [entry for entry in self._watched.values() if entry[2] <= now]
        await asyncio.gather(*(self._ask(conn, token) for conn, token, _ in due))

    async def _ask(self, conn: Connection, token: str) -> None:
        try:
            principal = await self.introspector.principal(token)
        except Unauthorized:
            conn.close(1008, "token is no longer active")
            self.forget(conn)
            return
        except (ServiceUnavailable, RateLimited) as error:
            log.warning("socket token not revalidated", connection_id=conn.id, error=error.code)
        else:
            before = conn.principal
            if before is not None and not before.same_caller(principal):
                conn.close(1008, "the token now names another tenant or user")
                self.forget(conn)
                return
            # Still active, perhaps with other scopes now: the socket acts with these.
            conn.principal = principal
            end_unpermitted_subscriptions(conn, principal)
        if conn.id in self._watched:
            self._watched[conn.id] = (conn, token, time.monotonic() + self.every)
