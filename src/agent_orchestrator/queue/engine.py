"""The task engine of one process: queue, ledger, runner, worker pool and reconciler,
built from settings. `serve` runs it in-process unless `--no-worker`; `worker` runs only it."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.aio import cancel_and_wait
from agent_orchestrator.config import Settings
from agent_orchestrator.events.bus import EventBus
from agent_orchestrator.events.memory import MemoryEventBus
from agent_orchestrator.events.redis import RedisEventBus
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.queue.base import TaskQueue
from agent_orchestrator.queue.consumer import TaskRunner, WorkerPool
from agent_orchestrator.queue.memory import MemoryTaskQueue
from agent_orchestrator.queue.producer import TaskProducer
from agent_orchestrator.queue.reconciler import Reconciler, Sweep
from agent_orchestrator.queue.registry import HandlerRegistry, load_handler_modules
from agent_orchestrator.services.task_ledger import TaskLedger

log = get_logger(__name__)


def build_bus(settings: Settings, redis: Redis | None) -> EventBus:
    if redis is None:
        return MemoryEventBus(
            stream_cap=settings.events_stream_cap, ttl_seconds=settings.events_ttl
        )
    return RedisEventBus(
        redis,
        namespace=settings.redis_namespace,
        stream_cap=settings.events_stream_cap,
        ttl_seconds=settings.events_ttl,
    )


def build_queue(settings: Settings, redis: Redis | None) -> TaskQueue:
    names = [settings.queue_interactive, settings.queue_bulk]
    if redis is None:
        return MemoryTaskQueue(names)
    from agent_orchestrator.queue.saq_backend import SaqTaskQueue

    return SaqTaskQueue(
        redis,
        namespace=settings.redis_namespace,
        queue_names=names,
        job_timeout=int(settings.task_timeout + settings.shutdown_grace + settings.lease_ttl),
        heartbeat=int(max(settings.lease_ttl, 1)),
    )


def build_ledger(
    settings: Settings,
    factory: async_sessionmaker[AsyncSession],
    bus: EventBus,
    queue: TaskQueue,
) -> TaskLedger:
    return TaskLedger(
        factory,
        bus,
        TaskProducer(queue),
        default_max_attempts=settings.max_attempts,
        lease_ttl=settings.lease_ttl,
    )


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerEngine:
    """Runs tasks in this process until stopped."""

    settings: Settings
    ledger: TaskLedger
    queue: TaskQueue
    bus: EventBus
    registry: HandlerRegistry
    db_factory: async_sessionmaker[AsyncSession]
    services: dict[str, Any] = field(default_factory=dict)
    #: the reconciler's sweeps beyond the ledger's own (a batch's end: services/batches.py)
    sweeps: list[Sweep] = field(default_factory=list)
    worker_id: str = field(default_factory=new_worker_id)

    def __post_init__(self) -> None:
        load_handler_modules(self.registry, self.settings.task_handler_modules)
        self.runner = TaskRunner(
            ledger=self.ledger,
            registry=self.registry,
            bus=self.bus,
            db_factory=self.db_factory,
            worker_id=self.worker_id,
            task_timeout=self.settings.task_timeout,
            lease_ttl=self.settings.lease_ttl,
            backoff_initial=self.settings.retry_backoff_initial,
            backoff_max=self.settings.retry_backoff_max,
            services=self.services,
        )
        self.pool = WorkerPool(
            self.queue,
            self.runner,
            {
                self.settings.queue_interactive: self.settings.max_concurrent_tasks,
                self.settings.queue_bulk: self.settings.bulk_concurrency,
            },
        )
        self.reconciler = Reconciler(
            self.ledger,
            self.queue,
            interval=self.settings.reconcile_interval,
            stale_after=self.settings.queued_stale_after,
            sweeps=self.sweeps,
        )
        self._reconciling: asyncio.Task[None] | None = None
        self._stop_reconciling = asyncio.Event()

    async def start(self) -> None:
        self.pool.start()
        self._reconciling = asyncio.create_task(
            self.reconciler.run_until(self._stop_reconciling), name="reconciler"
        )
        log.info("worker started", worker_id=self.worker_id, kinds=self.registry.names())

    async def stop(self, grace: float | None = None) -> None:
        if self._reconciling is not None:
            self._stop_reconciling.set()
            await asyncio.wait({self._reconciling}, timeout=5)
            await cancel_and_wait(self._reconciling)
        await self.pool.stop(self.settings.shutdown_grace if grace is None else grace)
        log.info("worker stopped", worker_id=self.worker_id)
