"""Server-Sent Events framing shared by every streaming endpoint.

`id:` is the event cursor (send it back as `Last-Event-ID` to resume), `event:` the type,
`data:` the JSON envelope; a comment line keeps idle connections open through proxies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from fastapi.responses import StreamingResponse

from agent_orchestrator.aio import cancel_and_wait
from agent_orchestrator.events.bus import EventBus
from agent_orchestrator.events.models import Event, StreamKey

KEEPALIVE = b": keep-alive\n\n"
_DONE = object()


def frame(event: Event) -> bytes:
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


async def event_frames(
    bus: EventBus,
    stream: StreamKey,
    after: int | None,
    *,
    is_last: Callable[[Event], bool],
    keepalive_seconds: float,
) -> AsyncIterator[bytes]:
    """Replay after `after`, then live events, until one for which `is_last` is true."""
    yield b"retry: 2000\n\n"
    inbox: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        # A separate task, so that waiting with a keep-alive timeout never cancels the
        # subscription's iterator half-way.
        try:
            async with bus.subscribe(stream, after) as events:
                async for event in events:
                    await inbox.put(event)
        finally:
            await inbox.put(_DONE)

    pumping = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), keepalive_seconds)
            except TimeoutError:
                yield KEEPALIVE
                continue
            if item is _DONE:
                return
            assert isinstance(item, Event)
            yield frame(item)
            if is_last(item):
                return
    finally:
        # Cancel until it ends: a cancellation landing inside a Redis read can be
        # swallowed, and a reader left behind would keep its subscription forever.
        with suppress(Exception):
            await cancel_and_wait(pumping)


def sse_response(frames: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
