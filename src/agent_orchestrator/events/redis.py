"""Redis event bus: a capped Stream per task and per session (replay, EVENTS_TTL) written
atomically with the Pub/Sub publish by one Lua script, and one Pub/Sub connection per
process that fans events out to this process's subscribers.

A process listens on the events channel only from its first subscriber on: a worker has
none, and receiving (and parsing) every event of the platform cost it as much CPU as
publishing its own. The control channel is listened to from the start."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agent_orchestrator.aio import cancel_and_wait
from agent_orchestrator.events.bus import Handover, KeyWrite, LocalFanoutBus
from agent_orchestrator.events.models import Event, StreamKey
from agent_orchestrator.events.script_batch import ScriptBatcher
from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)

#: How long a new subscriber waits for the events channel to be live before it starts
#: anyway (it then replays the log once the channel is live).
LIVE_WAIT_SECONDS = 5.0
#: Marks a hand-over (EventBus.publish_many) on the events channel.
HANDOVER_PREFIX = "h|"

# KEYS[1] id counter, KEYS[2] channel, KEYS[3..] the keys to set (ARGV[4] of them), then
# the streams of every event in turn; ARGV[1] cap, ARGV[2] ttl, ARGV[3] a hand-over
# message for the channel or '', ARGV[4] how many keys to set, then per key its text and
# its ttl, then per event: how many of KEYS are its streams, its JSON.
# Each id is max(previous + 1, server clock in microseconds): ids rise monotonically and
# keep rising even if Redis lost its data, so an old client cursor never hides new events.
_PUBLISH = """
local clock = redis.call('TIME')
local id = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'),
                    tonumber(clock[1]) * 1000000 + tonumber(clock[2]) - 1)
local ids = {}
local writes = tonumber(ARGV[4])
for i = 1, writes do
  redis.call('SET', KEYS[2 + i], ARGV[3 + 2 * i], 'EX', ARGV[4 + 2 * i])
end
local key = 3 + writes
if ARGV[3] ~= '' then
  redis.call('PUBLISH', KEYS[2], ARGV[3])
end
for arg = 5 + 2 * writes, #ARGV, 2 do
  id = id + 1
  local sid = string.format('%d', id)
  for i = key, key + tonumber(ARGV[arg]) - 1 do
    redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], sid .. '-0', 'e', ARGV[arg + 1])
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
  key = key + tonumber(ARGV[arg])
  redis.call('PUBLISH', KEYS[2], sid .. '|' .. ARGV[arg + 1])
  ids[#ids + 1] = sid
end
redis.call('SET', KEYS[1], string.format('%d', id))
return ids
"""


#: The largest id part of a Redis stream entry: a cursor past it has nothing after it.
LARGEST_ID = 2**64 - 1


class RedisEventBus(LocalFanoutBus):
    def __init__(self, redis: Redis, *, namespace: str, stream_cap: int, ttl_seconds: int) -> None:
        super().__init__()
        self._redis = redis
        self._ns = namespace
        self._cap = stream_cap
        self._ttl = ttl_seconds
        self._events_channel = f"{namespace}:events"
        self._events_channel_bytes = self._events_channel.encode()
        self._control_channel = f"{namespace}:control"
        self._counter = f"{namespace}:events:seq"
        self._publisher = ScriptBatcher(redis, _PUBLISH)  # a client of its own
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._pubsub: PubSub | None = None
        self._events_wanted = False  # a subscriber came: listen to the events channel
        self._events_live = asyncio.Event()  # Redis confirmed that we listen to it

    async def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="event-bus-reader")
            await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def close(self) -> None:
        if self._reader is not None:
            await cancel_and_wait(self._reader)
            self._reader = None
        await self._publisher.aclose()

    async def publish(self, event: Event) -> Event:
        return (await self.publish_many([event]))[0]

    async def publish_many(
        self,
        events: Sequence[Event],
        handover: Handover | None = None,
        writes: Sequence[KeyWrite] = (),
    ) -> list[Event]:
        if not events and handover is None and not writes:
            return []
        keys = [self._counter, self._events_channel]
        # On the events channel, marked by its prefix (an event's message starts with
        # its id's digits): only processes that listen for events take hand-overs.
        note = f"{HANDOVER_PREFIX}{handover[0]}|{handover[1]}" if handover else ""
        args: list[Any] = [self._cap, self._ttl, note, len(writes)]
        for write in writes:
            keys.append(write.key)
            args += [write.text, write.ttl_seconds]
        for event in events:
            streams = [s.name(self._ns) for s in event.streams()]
            keys += streams
            args += [len(streams), event.model_dump_json(exclude={"id"})]
        ids = await self._publisher.run(keys, args)
        return [
            event.model_copy(update={"id": raw.decode() if isinstance(raw, bytes) else raw})
            for event, raw in zip(events, ids, strict=True)
        ]

    async def replay(self, stream: StreamKey, after: int | None, limit: int) -> list[Event]:
        if after is not None and after > LARGEST_ID:
            return []  # nothing can follow it; Redis would refuse the id
        start = f"({after}-0" if after else "-"
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(  # type: ignore[assignment]
            stream.name(self._ns), min=start, max="+", count=limit
        )
        events = []
        for entry_id, fields in entries:
            event = Event.model_validate_json(fields[b"e"])
            event.id = entry_id.decode().split("-", 1)[0]
            events.append(event)
        return events

    async def live(self) -> None:
        if self._events_live.is_set():
            return
        if not self._events_wanted:
            self._events_wanted = True
            pubsub = self._pubsub
            if pubsub is not None:
                # A broken connection is the reader's to renew (with the events channel).
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    await pubsub.subscribe(self._events_channel)
        # Redis down: the subscriber starts all the same, and replays the log once the
        # feed is live (as after any reconnect).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LIVE_WAIT_SECONDS):
                await self._events_live.wait()

    async def publish_control(self, message: dict[str, Any]) -> None:
        await self._redis.publish(self._control_channel, json.dumps(message))

    # --- the one live listener of this process -------------------------------------------
    async def _read_forever(self) -> None:
        delay = 0.1
        while True:
            pubsub: PubSub = self._redis.pubsub()
            self._events_live.clear()
            self._pubsub = pubsub  # before the channels are chosen: see live()
            try:
                channels = [self._control_channel]
                if self._events_wanted:
                    channels.append(self._events_channel)
                await pubsub.subscribe(*channels)
                self._subscribed.set()
                delay = 0.1
                async for message in pubsub.listen():
                    await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                log.warning("event bus lost Redis; reconnecting", error=str(error))
            finally:
                self._pubsub = None
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            if message["channel"] == self._events_channel_bytes:
                # Live from here. Whatever was published while we were not listening
                # (before a reconnect) is in the replay logs: every subscriber reads them.
                for subscriber in self._fanout.all_subscribers():
                    subscriber.needs_replay.set()
                self._events_live.set()
            return
        if kind != "message":
            return
        channel = message["channel"].decode()
        data = message["data"].decode()
        if data.startswith(HANDOVER_PREFIX):
            key, _, text = data[len(HANDOVER_PREFIX) :].partition("|")
            self._fanout.hand_over(key, text)
            return
        try:
            if channel == self._control_channel:
                await self._fanout.dispatch_control(json.loads(data))
                return
            event_id, _, payload = data.partition("|")
            event = Event.model_validate_json(payload)
            event.id = event_id  # a fresh object of ours: no copy needed
        except Exception:
            log.exception("dropping malformed bus message", channel=channel)
            return
        self._fanout.deliver(event)
