"""How a task row is shown: the task API's view, and the `task.status` event that
announces its state. Read-only; the ledger (task_ledger.py) makes the changes."""

from __future__ import annotations

from typing import Any

from agent_orchestrator.db.tables import ServiceCallRow, TaskRow
from agent_orchestrator.events.models import Event, EventType
from agent_orchestrator.models.task import ServiceCallView, TaskErrorInfo, TaskStatus, TaskView


def to_view(row: TaskRow, calls: list[ServiceCallRow] | None = None) -> TaskView:
    return TaskView(
        id=row.id,
        tenant_id=row.tenant_id,
        session_id=row.session_id,
        kind=row.kind,
        status=TaskStatus(row.status),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        progress=row.progress,
        result=row.result,
        error=TaskErrorInfo(**row.error) if row.error else None,
        cancel_requested=row.cancel_requested,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        service_calls=None
        if calls is None
        else [
            ServiceCallView(
                step=call.step,
                service=call.service,
                operation=call.operation,
                status=call.status,
                attempts=call.attempts,
                latency_ms=call.latency_ms,
                error=call.error,
                started_at=call.started_at,
                finished_at=call.finished_at,
            )
            for call in calls
        ],
    )


def status_event(row: TaskRow) -> Event:
    data: dict[str, Any] = {
        "status": row.status,
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "progress": row.progress,
    }
    if row.error:
        data["error"] = row.error
    if row.status == TaskStatus.SUCCEEDED and row.result is not None:
        data["result"] = row.result
    return Event(
        type=EventType.TASK_STATUS,
        tenant_id=row.tenant_id,
        session_id=str(row.session_id) if row.session_id else None,
        task_id=str(row.id),
        data=data,
    )
