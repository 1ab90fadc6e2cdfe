"""In-process event bus for embedded mode: ring buffers per stream, direct fan-out."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from agent_orchestrator.events.bus import LocalFanoutBus
from agent_orchestrator.events.models import Event, StreamKey


class MemoryEventBus(LocalFanoutBus):
    def __init__(self, *, stream_cap: int, ttl_seconds: float, max_streams: int = 10_000) -> None:
        super().__init__()
        self._streams: OrderedDict[StreamKey, deque[tuple[float, Event]]] = OrderedDict()
        self._cap = stream_cap
        self._ttl = ttl_seconds
        self._max_streams = max_streams
        self._last_id = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, event: Event) -> Event:
        # Ids follow the clock (microseconds) so they keep rising across restarts too.
        self._last_id = max(self._last_id + 1, time.time_ns() // 1000)
        stamped = event.model_copy(update={"id": str(self._last_id)})
        now = time.monotonic()
        streams = stamped.streams()
        for stream in streams:
            log = self._streams.get(stream)
            if log is None:
                log = self._streams[stream] = deque(maxlen=self._cap)
            self._streams.move_to_end(stream)
            log.append((now, stamped))
        while len(self._streams) > self._max_streams:
            self._streams.popitem(last=False)
        self._fanout.deliver(stamped, streams)
        return stamped

    async def replay(self, stream: StreamKey, after: int | None, limit: int) -> list[Event]:
        log = self._streams.get(stream)
        if not log:
            return []
        horizon = time.monotonic() - self._ttl
        while log and log[0][0] < horizon:
            log.popleft()
        floor = after or 0
        return [event for _, event in log if event.cursor > floor][:limit]

    async def publish_control(self, message: dict[str, Any]) -> None:
        await self._fanout.dispatch_control(message)
