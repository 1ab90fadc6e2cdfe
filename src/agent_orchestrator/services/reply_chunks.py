"""Forwarding a streamed reply's pieces as chunk events, coalesced under back-pressure.

Every chunk event is a publish (in production a Redis round trip, then one message to
every API instance and every follower), and a model or agent service can deliver pieces
far faster than that. So the first piece goes out at once (time to first token), and
the pieces that arrive while an event is being published are sent together as the next
one. A slow model still gets one event per piece; a fast one gets a few larger events,
not one per token. `index` counts the events of the reply (0, 1, 2, ...), and their
`chunk`s concatenate to the reply either way (docs/api.md, `chat.stream`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from agent_orchestrator.models.agent import ReplyChunk


class ChunkForwarder:
    def __init__(self, on_chunk: Callable[[ReplyChunk], Awaitable[None]]) -> None:
        self._on_chunk = on_chunk
        self._pending: list[str] = []
        self._sent = 0
        self._publishing: asyncio.Task[None] | None = None

    async def add(self, piece: str) -> None:
        """Takes one piece: the reply's first is published before this returns; later
        ones go to a background task, which publishes whatever has gathered since its
        last publish as one event, so the stream is read on meanwhile. A failed
        background publish is raised here, at the next piece."""
        publishing = self._publishing
        if publishing is not None and publishing.done():
            self._publishing = None
            publishing.result()  # raises what the background publish raised
            publishing = None
        if publishing is None and not self._pending and self._sent == 0:
            await self._emit(piece)
            return
        self._pending.append(piece)
        if publishing is None:
            self._publishing = asyncio.create_task(self._drain(), name="reply-chunks")

    async def flush(self) -> None:
        """Waits until every piece taken is published (raising a failed publish)."""
        publishing, self._publishing = self._publishing, None
        if publishing is not None:
            await publishing
        if self._pending:
            await self._drain()

    def cancel(self) -> None:
        """The stream was cancelled: what is still queued is dropped."""
        self._pending.clear()
        publishing, self._publishing = self._publishing, None
        if publishing is None:
            return
        if publishing.done():
            if not publishing.cancelled():
                publishing.exception()  # retrieved, so asyncio does not log it as lost
        else:
            publishing.cancel()

    async def _drain(self) -> None:
        while self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            await self._emit(text)

    async def _emit(self, text: str) -> None:
        index = self._sent
        self._sent += 1
        await self._on_chunk(ReplyChunk(content=text, index=index))
