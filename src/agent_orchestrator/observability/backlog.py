"""Gauges read from the database when `/metrics` is scraped: the queues' backlog (depth
and lag) and the sessions active. The ledger is the system of record, so these are the
same whatever Redis holds, and the same on every API instance.

They cost two indexed queries per refresh (tasks by status, sessions by expiry), at most
once per five seconds per process however often Prometheus scrapes; a scrape that
finds the database away keeps the last values, and says so in the log.
"""

from __future__ import annotations

import time
from datetime import datetime

from prometheus_client import Gauge
from sqlalchemy import bindparam, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.db.tables import SessionRow, TaskRow
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import PREFIX

log = get_logger(__name__)

QUEUE_DEPTH = Gauge(
    f"{PREFIX}_queue_depth", "Tasks queued and not yet claimed (from the ledger)", ["queue"]
)
QUEUE_LAG = Gauge(
    f"{PREFIX}_queue_lag_seconds",
    "How long the oldest due task of the queue has waited to be claimed; 0 when none",
    ["queue"],
)
TASKS_RUNNING = Gauge(
    f"{PREFIX}_tasks_running", "Tasks claimed by a worker and not finished", ["queue"]
)
SESSIONS_ACTIVE = Gauge(f"{PREFIX}_sessions_active", "Sessions open and not expired")

_REFRESH_SECONDS = 5.0

_T = TaskRow.__table__.c
_NOW = bindparam("now", type_=_T.updated_at.type)
# Waiting since it was queued, or since it became due when it was queued for later (a
# retry's backoff): the two minima, per queue and status.
_BACKLOG = (
    select(
        _T.queue,
        _T.status,
        func.count(),
        func.min(case((_T.not_before.is_(None), _T.updated_at))),
        func.min(case((_T.not_before <= _NOW, _T.not_before))),
    )
    .where(_T.status.in_(("queued", "running")))
    .group_by(_T.queue, _T.status)
)
_S = SessionRow.__table__.c
_LIVE_SESSIONS = select(func.count()).where(
    _S.expires_at > bindparam("now", type_=_S.expires_at.type), _S.state == "active"
)


class BacklogGauges:
    def __init__(self, min_interval: float = _REFRESH_SECONDS) -> None:
        self.min_interval = min_interval
        self._refreshed_at = -min_interval
        #: every queue reported so far: one that empties is reported as 0, not forgotten
        self._queues: set[str] = set()

    async def refresh(
        self,
        factory: async_sessionmaker[AsyncSession],
        now: datetime,
        queues: tuple[str, ...],
    ) -> None:
        """Read the gauges again unless they were read within `min_interval` seconds;
        `queues` are reported even when empty."""
        moment = time.monotonic()
        if moment - self._refreshed_at < self.min_interval:
            return
        self._refreshed_at = moment
        try:
            async with factory() as db:
                backlog = (await db.execute(_BACKLOG, {"now": now})).all()
                live = (await db.execute(_LIVE_SESSIONS, {"now": now})).scalar_one()
        except Exception as error:  # a scrape must not fail: keep the last values
            log.warning("backlog metrics not refreshed", error=repr(error))
            return
        self._queues.update(queues)
        self._queues.update(row[0] for row in backlog)
        depth = dict.fromkeys(self._queues, 0)
        running = dict.fromkeys(self._queues, 0)
        lag = dict.fromkeys(self._queues, 0.0)
        for queue, status, count, waiting_since, due_since in backlog:
            if status == "running":
                running[queue] = count
                continue
            depth[queue] = count
            oldest = min((t for t in (waiting_since, due_since) if t is not None), default=None)
            if oldest is not None:
                lag[queue] = max(0.0, (now - oldest).total_seconds())
        for queue in depth:
            QUEUE_DEPTH.labels(queue).set(depth[queue])
            TASKS_RUNNING.labels(queue).set(running[queue])
            QUEUE_LAG.labels(queue).set(lag[queue])
        SESSIONS_ACTIVE.set(live)
