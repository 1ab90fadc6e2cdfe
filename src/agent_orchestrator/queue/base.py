"""The queue contract: it carries task ids to workers. The database ledger, not the queue,
decides whether a delivery runs, so the queue only needs to be fast and usually right."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt to hand a task to a worker. `key` is unique per (task, delivery number):
    the queue refuses a second copy of a key it still holds, the ledger refuses the rest."""

    task_id: str
    tenant_id: str
    queue: str
    number: int

    @property
    def key(self) -> str:
        return f"{self.task_id}:{self.number}"

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "tenant_id": self.tenant_id,
            "queue": self.queue,
            "number": self.number,
        }


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
