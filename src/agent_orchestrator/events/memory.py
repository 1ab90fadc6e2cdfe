"""In-process event bus for embedded mode: ring buffers per stream, direct fan-out.

The buffers keep each event as its JSON text, not as the model: text is invisible to the
garbage collector, a model is half a dozen objects it must walk. Kept as models, the
events of the last 10,000 streams were most of what a long-running embedded server
retained (~80 objects per chat turn), and each young collection walked 50,000 of them
(threshold in websocket/server.py): pauses of 17-54 ms every few hundred turns, measured
here, which were the p99 of a turn at half the peak rate. Replay, the rare path, parses.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from agent_orchestrator.events.bus import LocalFanoutBus
from agent_orchestrator.events.models import Event, StreamKey


class MemoryEventBus(LocalFanoutBus):
    def __init__(self, *, stream_cap: int, ttl_seconds: float, max_streams: int = 10_000) -> None:
        super().__init__()
        #: stream -> (published at, cursor, event JSON), oldest first
        self._streams: OrderedDict[StreamKey, deque[tuple[float, int, str]]] = OrderedDict()
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
        kept = (time.monotonic(), self._last_id, stamped.model_dump_json())
        streams = stamped.streams()
        for stream in streams:
            log = self._streams.get(stream)
            if log is None:
                log = self._streams[stream] = deque(maxlen=self._cap)
            self._streams.move_to_end(stream)
            log.append(kept)
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
        texts = [text for _, cursor, text in log if cursor > floor][:limit]
        return [Event.model_validate_json(text) for text in texts]

    async def publish_control(self, message: dict[str, Any]) -> None:
        await self._fanout.dispatch_control(message)
