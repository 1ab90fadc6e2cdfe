"""The event bus contract, and the subscription logic both backends share.

A subscription registers for live events first, then replays the log after the client's
cursor, then yields live events whose id is above the last one it yielded: no gap (live
events that race the replay are buffered) and no duplicate (ids only rise).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from agent_orchestrator.events.models import Event, StreamKey

ControlHandler = Callable[[dict[str, Any]], Awaitable[None]]
#: (key, text): a hand-over, see `EventBus.publish_many`.
HandoverHandler = Callable[[str, str], None]
#: A text for whichever process awaits its key: (key, text).
Handover = tuple[str, str]


@dataclass(frozen=True)
class KeyWrite:
    """A Redis key that a publish sets before its events go out, in the same round trip:
    what a client reads once it has seen them (a session's hot copy) is there by then,
    and costs no round trip of its own. Only the Redis bus takes them; in-process stores
    write their own at once."""

    key: str
    text: str
    ttl_seconds: int


class SubscriberOverflow(Exception):
    """The subscriber did not keep up: its bounded queue filled, so it was cut off."""


class _Waker:
    """The future a subscriber's iterator sleeps on, shared by the subscriber and its
    replay flag. A flag holding the subscriber (or its bound method) would make a
    reference cycle per subscription, freed only by the garbage collector: one per `wait`
    turn, for instance, and what the collector must walk makes its pauses (see
    events/memory.py)."""

    __slots__ = ("waiter",)

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Flag:
    """Set, cleared and read like asyncio.Event, but setting it wakes its subscriber."""

    __slots__ = ("_set", "_waker")

    def __init__(self, waker: _Waker) -> None:
        self._set = False
        self._waker = waker

    def set(self) -> None:
        self._set = True
        self._waker.wake()

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


class Subscriber:
    """One local consumer of one stream, fed by the bus's single live listener.

    Its iterator sleeps on one future that a delivered event or a replay request wakes:
    waiting on the queue and the replay flag as two tasks cost two task creations and an
    asyncio.wait for every event delivered."""

    def __init__(self, stream: StreamKey, max_queue: int) -> None:
        self.stream = stream
        self.queue: deque[Event] = deque()
        self.max_queue = max_queue
        self.overflowed = False
        self.last_id = 0
        self._waker = _Waker()
        # Set by a backend whose live feed broke (e.g. Redis reconnect): read the log again.
        self.needs_replay = _Flag(self._waker)

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        if len(self.queue) >= self.max_queue:
            self.overflowed = True
        else:
            self.queue.append(event)
        self._waker.wake()

    async def changed(self) -> None:
        """Returns once there is an event to take or a replay to do."""
        if self.queue or self.needs_replay.is_set():
            return
        waiter = self._waker.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waker.waiter = None


class EventBus(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, event: Event) -> Event: ...
    async def publish_many(
        self,
        events: Sequence[Event],
        handover: Handover | None = None,
        writes: Sequence[KeyWrite] = (),
    ) -> list[Event]:
        """Several events, in order, with rising ids; on Redis in one round trip.

        `handover` goes to the `on_handover` handler of every process listening, before
        the events: never stored, so a process that was not listening (or one that
        replays) does not get it, and whoever awaits it must have a way without it.
        `writes` are set before the events go out (Redis only, see `KeyWrite`)."""
        ...

    async def replay(self, stream: StreamKey, after: int | None, limit: int) -> list[Event]: ...
    def subscribe(
        self,
        stream: StreamKey,
        after: int | None = None,
        *,
        replay: bool = True,
        max_queue: int = 1000,
    ) -> AbstractSubscription: ...
    async def publish_control(self, message: dict[str, Any]) -> None: ...
    def on_control(self, handler: ControlHandler) -> None: ...
    def on_handover(self, handler: HandoverHandler) -> None: ...
    def subscriber_count(self) -> int: ...


AbstractSubscription = Any  # an async context manager yielding an AsyncIterator[Event]

REPLAY_PAGE = 500


class LocalFanout:
    """Subscribers of this process by stream; the backends feed it from their one listener."""

    def __init__(self) -> None:
        self._by_stream: dict[StreamKey, set[Subscriber]] = {}
        self._control: list[ControlHandler] = []
        self._handover: HandoverHandler | None = None

    def add(self, subscriber: Subscriber) -> None:
        self._by_stream.setdefault(subscriber.stream, set()).add(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        group = self._by_stream.get(subscriber.stream)
        if group is not None:
            group.discard(subscriber)
            if not group:
                del self._by_stream[subscriber.stream]

    def deliver(self, event: Event, streams: list[StreamKey] | None = None) -> None:
        """To the subscribers of the event's streams (`streams`, when the caller has them)."""
        for stream in event.streams() if streams is None else streams:
            for subscriber in list(self._by_stream.get(stream, ())):
                subscriber.offer(event)

    def all_subscribers(self) -> list[Subscriber]:
        return [sub for group in self._by_stream.values() for sub in group]

    def count(self) -> int:
        return sum(len(group) for group in self._by_stream.values())

    def on_control(self, handler: ControlHandler) -> None:
        self._control.append(handler)

    async def dispatch_control(self, message: dict[str, Any]) -> None:
        for handler in list(self._control):
            await handler(message)

    def on_handover(self, handler: HandoverHandler) -> None:
        self._handover = handler

    def hand_over(self, key: str, text: str) -> None:
        if self._handover is not None:
            self._handover(key, text)


ReplayFn = Callable[[StreamKey, int | None, int], Awaitable[list[Event]]]


@asynccontextmanager
async def subscription(
    fanout: LocalFanout,
    replay_fn: ReplayFn,
    stream: StreamKey,
    after: int | None,
    *,
    replay: bool,
    max_queue: int,
    live: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[AsyncIterator[Event]]:
    """`after` given: events after it. No `after`: the whole log when `replay`, else only
    what is published from now on. `live` is awaited first: the backend's live feed is
    on from then on (the Redis bus listens for events only once it has a subscriber)."""
    if live is not None:
        await live()
    subscriber = Subscriber(stream, max_queue)
    subscriber.last_id = after or 0
    if replay or after is not None:
        subscriber.needs_replay.set()
    fanout.add(subscriber)
    try:
        yield _iterate(subscriber, replay_fn)
    finally:
        fanout.remove(subscriber)


async def _replay_missed(subscriber: Subscriber, replay_fn: ReplayFn) -> AsyncIterator[Event]:
    subscriber.needs_replay.clear()
    while True:
        page = await replay_fn(subscriber.stream, subscriber.last_id, REPLAY_PAGE)
        for event in page:
            if event.cursor > subscriber.last_id:
                subscriber.last_id = event.cursor
                yield event
        if len(page) < REPLAY_PAGE:
            return


async def _iterate(subscriber: Subscriber, replay_fn: ReplayFn) -> AsyncIterator[Event]:
    queue = subscriber.queue
    while True:
        if subscriber.needs_replay.is_set():
            # The live feed broke and came back (or this is the start): the log holds what
            # it missed, and those events come before anything still queued. Queued events
            # that the replay already yielded are skipped below by their id.
            async for event in _replay_missed(subscriber, replay_fn):
                yield event
            continue
        if not queue:
            if subscriber.overflowed:
                raise SubscriberOverflow(str(subscriber.stream))
            await subscriber.changed()
            continue
        event = queue.popleft()
        if event.cursor > subscriber.last_id:
            subscriber.last_id = event.cursor
            yield event


class LocalFanoutBus:
    """What both backends share: this process's subscribers, fed by the backend's one
    live feed, and the subscription logic over the backend's `replay`."""

    def __init__(self) -> None:
        self._fanout = LocalFanout()

    async def publish(self, event: Event) -> Event:
        raise NotImplementedError

    async def publish_many(
        self,
        events: Sequence[Event],
        handover: Handover | None = None,
        writes: Sequence[KeyWrite] = (),
    ) -> list[Event]:
        if writes:
            raise ValueError("this bus keeps no keys: in-process stores write their own")
        if handover is not None:
            self._fanout.hand_over(*handover)
        return [await self.publish(event) for event in events]

    async def replay(self, stream: StreamKey, after: int | None, limit: int) -> list[Event]:
        raise NotImplementedError

    def subscribe(
        self,
        stream: StreamKey,
        after: int | None = None,
        *,
        replay: bool = True,
        max_queue: int = 1000,
    ) -> AbstractSubscription:
        return subscription(
            self._fanout,
            self.replay,
            stream,
            after,
            replay=replay,
            max_queue=max_queue,
            live=self.live,
        )

    async def live(self) -> None:
        """Returns once events published from now on reach this process's subscribers."""
        return None

    def on_control(self, handler: ControlHandler) -> None:
        self._fanout.on_control(handler)

    def on_handover(self, handler: HandoverHandler) -> None:
        self._fanout.on_handover(handler)

    def subscriber_count(self) -> int:
        return self._fanout.count()
