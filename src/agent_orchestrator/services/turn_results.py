"""Finished chat turns handed from the worker to a waiting `mode=wait` request of the same
process, instead of reading them back from the database.

When the API process runs the worker too (embedded mode, or `serve` with its worker), the
worker holds the turn's final rows at the moment it commits them: the task row the final
UPDATE returned, the service calls and the reply it wrote. Reading the same three things
back cost the waiting request a session and three SELECTs (~8% of an embedded turn's CPU).
Only a turn somebody waits for is kept, from `expect` to `take`; anything else (a worker
of another process, a retried attempt whose earlier rows may remain, a reply that was
already stored) falls back to the read-back. The values are those the database holds;
the key order of JSON objects may differ (PostgreSQL's JSONB orders keys its own way).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from agent_orchestrator.models.chat import ChatResponse


class TurnResults:
    def __init__(self) -> None:
        self._waiting: dict[uuid.UUID, ChatResponse | None] = {}

    def expect(self, task_id: uuid.UUID) -> None:
        """A request will wait for this turn: keep its result when it is offered."""
        self._waiting[task_id] = None

    def offer(self, task_id: uuid.UUID, build: Callable[[], ChatResponse]) -> None:
        """Called by the worker right after the turn's final commit; builds the response
        only when a request of this process waits for it."""
        if task_id in self._waiting:
            self._waiting[task_id] = build()

    def take(self, task_id: uuid.UUID) -> ChatResponse | None:
        """The offered result, or None (the caller reads the turn back); forgets the turn
        either way."""
        return self._waiting.pop(task_id, None)
