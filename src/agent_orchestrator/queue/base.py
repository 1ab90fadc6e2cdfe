"""The queue contract: it carries task ids to workers. The database ledger, not the queue,
decides whether a delivery runs, so the queue only needs to be fast and usually right."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt to hand a task to a worker. `key` is unique per (task, delivery number):
    the queue refuses a second copy of a key it still holds, the ledger refuses the rest.

    `kind` and `session_id` are the task's, so a worker can send the claim and the
    session's change in one statement (TaskLedger.claim); a delivery queued by an
    earlier version has neither, and its claim takes two."""

    task_id: str
    tenant_id: str
    queue: str
    number: int
    kind: str | None = None
    session_id: str | None = None

    @property
    def key(self) -> str:
        return f"{self.task_id}:{self.number}"

    def as_kwargs(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Delivery:
        """Read back from `as_kwargs`, ignoring names it does not know: a delivery queued
        by a later version still runs here (from what this version needs of it)."""
        return cls(
            **{field.name: kwargs[field.name] for field in fields(cls) if field.name in kwargs}
        )


class Received(Protocol):
    delivery: Delivery

    async def heartbeat(self) -> None: ...
    async def done(self) -> None: ...


class TaskQueue(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def enqueue(self, delivery: Delivery, *, delay: float = 0.0) -> bool: ...
    async def is_pending(self, delivery: Delivery) -> bool: ...
    async def receive(self, queue: str, wait_seconds: float) -> Received | None: ...
    async def promote_due(self) -> None: ...
    async def maintain(self) -> None: ...
    async def depth(self, queue: str) -> int: ...
