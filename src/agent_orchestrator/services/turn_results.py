"""Finished chat turns handed from the worker to the `mode=wait` request that waits for
them, instead of being read back from the database.

The worker holds a turn's final rows at the moment it commits them: the task row the
final UPDATE returned, the service calls and the reply it wrote. For a turn submitted
with `mode=wait` it serialises the answer from them and publishes it as a hand-over
together with the turn's last events (`EventBus.publish_many`): in-process in embedded
mode, on the events channel ahead of the events with Redis, so the waiting request has
it when the terminal event wakes it. Reading the same three things back cost that
request a session and three SELECTs: ~8% of an embedded turn's CPU, and three round
trips to PostgreSQL. Only a turn somebody here waits for is kept, from `expect` to
`take`; anything else (a retried attempt, whose earlier rows may remain; a reply that
was already stored; a hand-over this process was not listening for) falls back to the
read-back. The values are those the database holds; the key order of JSON objects may
differ (PostgreSQL's JSONB orders keys its own way).
"""

from __future__ import annotations

import uuid


class TurnResults:
    def __init__(self) -> None:
        self._waiting: dict[str, str | None] = {}

    def expect(self, task_id: uuid.UUID) -> None:
        """A request will wait for this turn: keep its answer when it is handed over."""
        self._waiting[str(task_id)] = None

    def offer(self, task_id: str, answer: str) -> None:
        """A hand-over from the bus: the turn's answer as JSON text; kept only when a
        request of this process waits for it (the first one, if it comes twice)."""
        if self._waiting.get(task_id, "") is None:
            self._waiting[task_id] = answer

    def take(self, task_id: uuid.UUID) -> str | None:
        """The answer handed over, or None (the caller reads the turn back); forgets the
        turn either way."""
        return self._waiting.pop(str(task_id), None)
