"""Server-Sent Events framing shared by every streaming endpoint.

`id:` is the event cursor (send it back as `Last-Event-ID` to resume), `event:` the type,
`data:` the JSON envelope; a comment line keeps idle connections open through proxies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Header, Query, Response
from fastapi.responses import StreamingResponse

from agent_orchestrator.aio import cancel_and_wait
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.errors import ValidationFailed, field_problem
from agent_orchestrator.events.bus import REPLAY_PAGE, EventBus
from agent_orchestrator.events.models import CURSOR_PATTERN, Event, StreamKey, parse_cursor

KEEPALIVE = b": keep-alive\n\n"
#: How long after a task or batch finished its final event may still be on its way to
#: the log.
FINAL_EVENT_GRACE = timedelta(seconds=5)
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


async def _final_event(
    bus: EventBus, stream: StreamKey, is_last: Callable[[Event], bool]
) -> Event | None:
    after = None
    while True:
        page = await bus.replay(stream, after, REPLAY_PAGE)
        found = next((event for event in page if is_last(event)), None)
        if found is not None or len(page) < REPLAY_PAGE:
            return found
        after = page[-1].cursor


async def _replayed(events: list[Event]) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    for event in events:
        yield frame(event)


async def finite_stream(
    bus: EventBus,
    stream: StreamKey,
    *,
    is_last: Callable[[Event], bool],
    finished_at: datetime | None,
    cursor: int | None,
    keepalive_seconds: float,
) -> Response:
    """A task's or a batch's events after `cursor` as SSE, ending with its last one; 204
    when nothing more will come (which also tells an EventSource to stop reconnecting).

    For a finished stream (`finished_at`: when its task or batch ended), followed live it
    would only wait forever when the client already has the final event (an EventSource
    reconnects whenever a stream ends, with the last id it saw): what came after that
    event (a service's late event, internal API) is replayed and the stream ends, or 204
    if nothing did. So does a log that no longer holds the final event (EVENTS_TTL
    passed, or Redis lost it), unless it ended a moment ago and the final event is being
    published right now (then the live stream delivers it)."""
    if finished_at is not None:
        final = await _final_event(bus, stream, is_last)
        unseen = await bus.replay(stream, cursor, REPLAY_PAGE)
        had_it = final is not None and cursor is not None and final.cursor <= cursor
        gone = final is None and finished_at < utcnow() - FINAL_EVENT_GRACE
        if had_it or (gone and not unseen):
            return sse_response(_replayed(unseen)) if unseen else Response(status_code=204)
    frames = event_frames(bus, stream, cursor, is_last=is_last, keepalive_seconds=keepalive_seconds)
    return sse_response(frames)


def cursor_from(last_event_id: str | None, after: str | None) -> int | None:
    """The client's cursor: `Last-Event-ID` (what an EventSource sends on reconnecting),
    else `after`. Both are checked whenever they are sent: an empty header must not let
    a bad `after` through unchecked."""
    header = _cursor("Last-Event-ID", last_event_id)
    return header if header is not None else _cursor("after", after)


def _cursor(field: str, raw: str | None) -> int | None:
    try:
        return parse_cursor(raw)
    except ValueError as error:
        where = "header" if field == "Last-Event-ID" else "query"
        raise ValidationFailed(
            f"{field} must be an event id", details=[field_problem(field, where, str(error))]
        ) from error


async def event_cursor(
    # The pattern is documented, not enforced by FastAPI: cursor_from's 422 names the
    # header as clients send it ("Last-Event-ID"), not as FastAPI spells its alias.
    last_event_id: Annotated[
        str | None, Header(json_schema_extra={"pattern": CURSOR_PATTERN})
    ] = None,
    after: Annotated[
        str | None, Query(max_length=32, json_schema_extra={"pattern": CURSOR_PATTERN})
    ] = None,
) -> int | None:
    return cursor_from(last_event_id, after)


#: Where an events endpoint resumes: `Last-Event-ID`, else `after` (None: from the start).
EventCursor = Annotated[int | None, Depends(event_cursor)]
