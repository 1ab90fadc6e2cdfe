"""Producer: hands a committed task to the queue as a numbered delivery."""

from __future__ import annotations

from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.queue.base import Delivery, TaskQueue


def delivery_of(row: TaskRow) -> Delivery:
    return Delivery(
        task_id=str(row.id),
        tenant_id=row.tenant_id,
        queue=row.queue,
        number=row.delivery,
        kind=row.kind,
        session_id=None if row.session_id is None else str(row.session_id),
    )


class TaskProducer:
    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue

    async def deliver(self, row: TaskRow, *, delay: float = 0.0) -> bool:
        return await self.queue.enqueue(delivery_of(row), delay=delay)

    async def is_pending(self, row: TaskRow) -> bool:
        return await self.queue.is_pending(delivery_of(row))
