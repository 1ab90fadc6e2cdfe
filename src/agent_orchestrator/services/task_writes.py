"""The values and statements of the task ledger's writes: a status move from its allowed
source states, one only the lease holder may make, and the columns a terminal or an
unleased task gets. services/task_ledger.py is their one caller: nothing else writes a
task's status."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from agent_orchestrator.db.prepared import Bound
from agent_orchestrator.db.repositories.tasks import Guard, transition_call
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.models.task import TaskStatus, sources_of
from agent_orchestrator.observability.metrics import TASKS_FINISHED


def status_write(
    tenant_id: str,
    task_id: uuid.UUID,
    target: TaskStatus,
    values: dict[str, Any],
    guard: Guard = Guard(),
    sources: list[str] | None = None,
) -> Bound:
    """A move to `target` from its allowed source states, or only from `sources` (some of
    them, or the target itself for a write that keeps the state), as a statement."""
    values = {"status": target.value, **values}
    return transition_call(tenant_id, task_id, sources or sources_of(target), values, guard)


def owned_write(task: TaskRow, worker_id: str, target: TaskStatus, values: dict[str, Any]) -> Bound:
    """A transition only the lease holder may make, in the attempt it claimed, as a
    statement."""
    return status_write(task.tenant_id, task.id, target, values, held_by(task, worker_id))


def held_by(task: TaskRow, worker_id: str) -> Guard:
    """The lease of `task`'s attempt (as claimed), held by `worker_id`."""
    return Guard(lease_owner=worker_id, attempt=task.attempt)


def terminal_values(status: TaskStatus, now: datetime) -> dict[str, Any]:
    return {
        "status": status.value,
        "finished_at": now,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }


def unleased(now: datetime) -> dict[str, Any]:
    return {"lease_owner": None, "lease_expires_at": None, "updated_at": now}


def seconds_until(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    return max(0.0, (moment - utcnow()).total_seconds())


def count_finished(row: TaskRow) -> None:
    TASKS_FINISHED.labels(row.kind, row.status).inc()
