"""Socket subscriptions, grouped by stream: one event-bus subscription per stream per
instance (a hub), however many sockets follow that stream.

Why: a bus subscription costs a consumer task and a few futures per event. A thousand
sockets on one session as a thousand bus subscriptions spent most of a 1,000-way fan-out
in that machinery; as one hub, an event is taken from the bus once, serialised once and
appended to each socket's outbox.

A member joining with a cursor (`after`, or a task's whole log) catches up without gap or
duplicate, the way the bus's own subscriptions do: it is registered with the hub first
(live events go to a backlog), then reads the log after its cursor, then the backlog;
every event is delivered only if its id is above the last one delivered. Catching up
waits for room in the socket's outbox (the log is pulled, so it can wait), while live
events never wait: a socket whose outbox overflows is closed as a slow consumer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from agent_orchestrator.events.bus import EventBus, SubscriberOverflow
from agent_orchestrator.events.models import Event, StreamKey, ends_stream
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.websocket.events import EventEncoder, error_message
from agent_orchestrator.websocket.metrics import SUBSCRIPTIONS

if TYPE_CHECKING:
    from agent_orchestrator.websocket.connection import Connection

log = get_logger(__name__)

REPLAY_PAGE = 200
HUB_QUEUE = 10_000  # events the bus may hold for a hub between two of its turns


class Member:
    """One socket following one stream."""

    __slots__ = ("backlog", "catch_up", "conn", "hub", "last_id", "missed", "until_terminal")

    def __init__(self, conn: Connection, hub: Hub, last_id: int, until_terminal: bool) -> None:
        self.conn = conn
        self.hub = hub
        self.last_id = last_id
        self.until_terminal = until_terminal
        self.backlog: deque[Event] | None = None  # set while catching up
        self.missed = False  # the backlog overflowed while catching up: read the log again
        self.catch_up: asyncio.Task[None] | None = None

    def offer(self, event: Event) -> None:
        """A live event from the hub; never waits."""
        if self.backlog is None:
            self.deliver(event)
        elif len(self.backlog) >= self.conn.limits.send_queue:
            self.backlog.clear()
            self.missed = True
        else:
            self.backlog.append(event)

    def deliver(self, event: Event) -> bool:
        """Queue `event` on the socket unless already delivered; False when this member
        is done (socket closing, or its task's terminal status, or its batch's final
        progress, was delivered)."""
        if event.cursor <= self.last_id:
            return True
        self.last_id = event.cursor
        if not self.conn.send(self.hub.fanout.encoder.encode(event)):
            return False
        if self.until_terminal and ends_stream(event):
            self.hub.fanout.leave(self.conn, self.hub.key)
            return False
        return True


class Hub:
    """The one bus subscription of a stream on this instance."""

    __slots__ = ("fanout", "key", "members", "ready", "task")

    def __init__(self, fanout: StreamFanout, key: StreamKey) -> None:
        self.fanout = fanout
        self.key = key
        self.members: set[Member] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        cursor: int | None = None
        try:
            while True:
                try:
                    async with self.fanout.bus.subscribe(
                        self.key, cursor, replay=cursor is not None, max_queue=HUB_QUEUE
                    ) as events:
                        if not self.ready.done():
                            self.ready.set_result(None)
                        async for event in events:
                            cursor = event.cursor
                            for member in list(self.members):
                                member.offer(event)
                    return
                except SubscriberOverflow:
                    # This process fell behind the bus: read the log again from the last
                    # event taken; members drop what they already have.
                    continue
        except Exception as error:
            log.warning("websocket stream hub failed", stream=self.key.kind, error=repr(error))
            if not self.ready.done():
                self.ready.set_exception(error)
            for member in list(self.members):
                self.fanout.lost(member)


class StreamFanout:
    def __init__(self, bus: EventBus, encoder: EventEncoder) -> None:
        self.bus = bus
        self.encoder = encoder
        self._hubs: dict[StreamKey, Hub] = {}

    def hub_count(self) -> int:
        return len(self._hubs)

    async def join(
        self,
        conn: Connection,
        key: StreamKey,
        *,
        after: int | None,
        replay: bool,
        until_terminal: bool,
        ack: str | None,
    ) -> None:
        """Follow `key` on `conn` (replacing any earlier subscription to it): live events
        from now, preceded by the log after `after` (or the whole log) when `replay`."""
        self.leave(conn, key)
        hub = self._hubs.get(key)
        if hub is None:
            hub = self._hubs[key] = Hub(self, key)
        try:
            await asyncio.shield(hub.ready)  # registered with the bus: nothing missed now
        except Exception:
            self._drop_if_empty(hub)
            raise
        if conn.closing:
            self._drop_if_empty(hub)
            return
        member = Member(conn, hub, after or 0, until_terminal)
        hub.members.add(member)
        conn.subscriptions[key] = member
        SUBSCRIPTIONS.inc()
        if ack is not None:
            conn.send(ack)
        if replay:
            member.backlog = deque()
            member.catch_up = asyncio.get_running_loop().create_task(self._catch_up(member))

    def leave(self, conn: Connection, key: StreamKey) -> bool:
        member = conn.subscriptions.pop(key, None)
        if member is None:
            return False
        SUBSCRIPTIONS.dec()
        member.hub.members.discard(member)
        if member.catch_up is not None and member.catch_up is not asyncio.current_task():
            member.catch_up.cancel()
        self._drop_if_empty(member.hub)
        return True

    def lost(self, member: Member) -> None:
        """The stream cannot be followed (the log is unreadable): say where to resume."""
        conn, key = member.conn, member.hub.key
        if conn.subscriptions.get(key) is member:
            self.leave(conn, key)
            conn.send(
                error_message(
                    "subscription_lost",
                    f"the {key.kind} subscription stopped; subscribe again with 'after'",
                    tenant_id=conn.tenant_id,
                    details={"after": str(member.last_id) if member.last_id else None},
                    retryable=True,
                )
            )

    def _drop_if_empty(self, hub: Hub) -> None:
        if not hub.members and self._hubs.get(hub.key) is hub:
            del self._hubs[hub.key]
            hub.task.cancel()

    def leave_all(self, conn: Connection) -> list[asyncio.Task[None]]:
        """Every subscription of `conn`; the tasks that end because of it (to await)."""
        ending: list[asyncio.Task[None]] = []
        for key, member in list(conn.subscriptions.items()):
            if member.catch_up is not None:
                ending.append(member.catch_up)
            self.leave(conn, key)
            if member.hub.key not in self._hubs or self._hubs[key] is not member.hub:
                ending.append(member.hub.task)
        return ending

    async def _catch_up(self, member: Member) -> None:
        conn, key = member.conn, member.hub.key
        try:
            while True:
                member.missed = False
                while True:
                    page = await self.bus.replay(key, member.last_id or None, REPLAY_PAGE)
                    for event in page:
                        await conn.wait_for_room()
                        if not member.deliver(event):
                            return
                    if len(page) < REPLAY_PAGE:
                        break
                if not member.missed:
                    break
            backlog = member.backlog
            while backlog:
                await conn.wait_for_room()
                if not member.deliver(backlog.popleft()):
                    return
            member.backlog = None  # no await since the backlog emptied: nothing slips by
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("websocket catch-up failed", stream=key.kind, error=repr(error))
            self.lost(member)
        finally:
            if member.catch_up is asyncio.current_task():
                member.catch_up = None
