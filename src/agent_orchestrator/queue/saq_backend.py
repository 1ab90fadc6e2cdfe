"""SAQ on Redis carrying deliveries to workers.

SAQ's defaults do not fit this workload (shared/reference/queues.md: a 10 s job timeout,
`retries=1` turning a swept job into ABORTED, a sweeper that waits ~5 s per stuck job).
Every job here sets them explicitly:
- `retries=1`: SAQ never re-runs a job by itself. Re-running is the reconciler's decision,
  taken from the database lease (the arbiter), so SAQ's sweep only tidies Redis.
- `timeout`: TASK_TIMEOUT plus the shutdown grace, so SAQ never cuts a job the runner
  still owns (the runner enforces TASK_TIMEOUT itself and records `timed_out`).
- `heartbeat`: the lease TTL; the runner touches the job each time it renews its lease.
The worker loop is ours (dequeue with a short timeout, bounded concurrency, graceful
drain); SAQ supplies the Redis data structures, dedupe by key, delayed jobs and sweeping.
SAQ's notifications on a job's own channel are not sent: nothing here listens to them
(the ledger and the event bus say what a task does), and each cost the worker a round
trip per turn.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from saq.job import Job, Status
from saq.queue.redis import RedisQueue

from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.queue.base import Delivery

log = get_logger(__name__)

FUNCTION = "run_task"
_PENDING = {Status.NEW, Status.QUEUED, Status.ACTIVE, Status.ABORTING}

# KEYS[1] SAQ's `incomplete` sorted set, KEYS[2] its `queued` list; ARGV[1] now (seconds).
# SAQ's own `schedule` script minus its lock: that lock is a SETEX in whole seconds, so
# only one promotion per queue per second ran however often workers asked, and a retry
# due in 50 ms waited up to a second. The script is atomic and a promoted job's score
# drops to 0 (out of the range), so concurrent callers never promote a job twice.
_PROMOTE = """
local jobs = redis.call('ZRANGEBYSCORE', KEYS[1], 1, ARGV[1])
for _, v in ipairs(jobs) do
  redis.call('ZADD', KEYS[1], 0, v)
  redis.call('RPUSH', KEYS[2], v)
end
return #jobs
"""


class _QuietQueue(RedisQueue):
    async def notify(self, job: Job) -> None:
        """No PUBLISH on the job's channel (see the module's docstring). SAQ's sweep waits
        `abort` seconds for a swept job's worker to answer on it; it then goes on."""


@dataclass
class _SaqReceived:
    delivery: Delivery
    job: Job
    #: the job's `active` mark, written while the runner claims the task
    marking: asyncio.Future[Any]

    async def heartbeat(self) -> None:
        await self._marked()
        await self.job.update()

    async def done(self) -> None:
        # After the mark: a late mark would bring back a finished job, with no expiry.
        await self._marked()
        await self.job.finish(Status.COMPLETE)

    async def _marked(self) -> None:
        try:
            await self.marking
        except Exception as error:  # bookkeeping for SAQ's sweep: the ledger decides
            log.warning("could not mark the job active", error=str(error))


class SaqTaskQueue:
    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        queue_names: list[str],
        job_timeout: int,
        heartbeat: int,
        result_ttl: int = 600,
    ) -> None:
        self._redis = redis
        self._queues = {
            name: _QuietQueue(redis, name=f"{namespace}:{name}") for name in queue_names
        }
        self._job_timeout = job_timeout
        self._heartbeat = heartbeat
        self._ttl = result_ttl
        self._promote = redis.register_script(_PROMOTE)

    async def start(self) -> None:
        for queue in self._queues.values():
            await queue.connect()

    async def close(self) -> None:
        # The Redis client is shared and closed by its owner; only SAQ's pubsub is ours.
        for queue in self._queues.values():
            await queue._pubsub.close()

    async def enqueue(self, delivery: Delivery, *, delay: float = 0.0) -> bool:
        job = Job(
            function=FUNCTION,
            kwargs=delivery.as_kwargs(),
            key=delivery.key,
            timeout=self._job_timeout,
            heartbeat=self._heartbeat,
            retries=1,
            ttl=self._ttl,
            scheduled=time.time() + delay if delay > 0 else 0,  # type: ignore[arg-type]
        )
        return await self._queues[delivery.queue].enqueue(job) is not None

    async def is_pending(self, delivery: Delivery) -> bool:
        job = await self._queues[delivery.queue].job(delivery.key)
        return job is not None and job.status in _PENDING

    async def receive(self, queue: str, wait_seconds: float) -> _SaqReceived | None:
        job = await self._queues[queue].dequeue(timeout=wait_seconds)
        if job is None:
            return None
        # Mark it active as SAQ's worker would (its sweeper reads the status), with one
        # SET, sent while the task is claimed rather than before: it sat between the
        # enqueue and the task's start. `done` and `heartbeat` wait for it. XX: a mark
        # that lands after the job was gone (Redis flushed meanwhile) must not bring it
        # back; KEEPTTL: nor take the expiry off one SAQ finished meanwhile (swept).
        job.started = job.touched = int(time.time() * 1000)
        job.attempts += 1
        job.status = Status.ACTIVE
        payload = self._queues[queue].serialize(job)
        marking = asyncio.ensure_future(self._redis.set(job.id, payload, xx=True, keepttl=True))
        return _SaqReceived(Delivery.from_kwargs(job.kwargs or {}), job, marking)

    async def promote_due(self) -> None:
        for queue in self._queues.values():
            keys = [queue.namespace("incomplete"), queue.namespace("queued")]
            await self._promote(keys=keys, args=[time.time()])

    async def maintain(self) -> None:
        for queue in self._queues.values():
            # abort=0.05: barely wait for a stuck job's worker to confirm (it is usually dead;
            # the ledger lease, not SAQ, decides about re-running).
            await queue.sweep(lock=5, abort=0.05)

    async def depth(self, queue: str) -> int:
        return await self._queues[queue].count("queued")
