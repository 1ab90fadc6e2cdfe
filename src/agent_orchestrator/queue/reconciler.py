"""Reconciler: repairs the gap between the ledger and the queue. Runs on every worker,
every RECONCILE_INTERVAL (with jitter), and is safe to run concurrently: every repair is
a conditional update only one reconciler can win."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence

from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import TASKS_RECOVERED
from agent_orchestrator.queue.base import TaskQueue
from agent_orchestrator.services.task_ledger import TaskLedger

log = get_logger(__name__)


#: A repair beyond the ledger's own, safe to run concurrently; returns what it repaired.
Sweep = Callable[[], Awaitable[int]]


class Reconciler:
    def __init__(
        self,
        ledger: TaskLedger,
        queue: TaskQueue,
        *,
        interval: float,
        stale_after: float,
        sweeps: Sequence[Sweep] = (),
    ) -> None:
        self.ledger = ledger
        self.queue = queue
        self.interval = interval
        self.stale_after = stale_after
        self.sweeps = tuple(sweeps)

    async def run_once(self) -> tuple[int, int]:
        expired = await self.ledger.recover_expired_leases()
        lost = await self.ledger.redeliver_lost(self.stale_after)
        await self.queue.maintain()
        for sweep in self.sweeps:
            await sweep()
        if expired:
            TASKS_RECOVERED.labels("lease_expired").inc(expired)
        if lost:
            TASKS_RECOVERED.labels("delivery_lost").inc(lost)
        return expired, lost

    async def run_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciler round failed")
            # Jitter keeps the reconcilers of many workers from moving in lockstep.
            pause = self.interval * random.uniform(0.75, 1.25)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
