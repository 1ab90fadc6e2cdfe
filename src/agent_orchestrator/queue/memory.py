"""In-process queue for embedded mode: one asyncio.Queue per queue name, timers for delays."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent_orchestrator.queue.base import Delivery


@dataclass
class _MemoryReceived:
    delivery: Delivery
    _pending: set[str] = field(repr=False)

    async def heartbeat(self) -> None:
        return None

    async def done(self) -> None:
        self._pending.discard(self.delivery.key)


class MemoryTaskQueue:
    def __init__(self, queue_names: list[str]) -> None:
        self._queues: dict[str, asyncio.Queue[Delivery]] = {
            name: asyncio.Queue() for name in queue_names
        }
        self._pending: set[str] = set()
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    async def enqueue(self, delivery: Delivery, *, delay: float = 0.0) -> bool:
        if delivery.key in self._pending:
            return False
        target = self._queues[delivery.queue]
        self._pending.add(delivery.key)
        if delay <= 0:
            target.put_nowait(delivery)
            return True
        loop = asyncio.get_running_loop()

        def release() -> None:
            self._timers.discard(timer)
            target.put_nowait(delivery)

        timer = loop.call_later(delay, release)
        self._timers.add(timer)
        return True

    async def is_pending(self, delivery: Delivery) -> bool:
        return delivery.key in self._pending

    async def receive(self, queue: str, wait_seconds: float) -> _MemoryReceived | None:
        try:
            delivery = await asyncio.wait_for(self._queues[queue].get(), wait_seconds)
        except TimeoutError:
            return None
        return _MemoryReceived(delivery, self._pending)

    async def promote_due(self) -> None:
        return None  # timers release delayed deliveries themselves

    async def maintain(self) -> None:
        return None

    async def depth(self, queue: str) -> int:
        return self._queues[queue].qsize()
