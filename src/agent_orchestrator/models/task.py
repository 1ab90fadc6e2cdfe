"""Task states, the one table of allowed transitions, and the task API models."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


TERMINAL = frozenset(
    {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}
)

#: Allowed transitions. running -> queued is a retry, a released task on shutdown, or a
#: lease that expired with its worker; queued -> failed is the reconciler giving up.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.QUEUED,
            TaskStatus.SUCCEEDED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
            TaskStatus.TIMED_OUT,
        }
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
    TaskStatus.TIMED_OUT: frozenset(),
}


def sources_of(target: TaskStatus) -> list[str]:
    """The states a task may be in to move to `target`: the WHERE clause of each write."""
    return [state.value for state, targets in TRANSITIONS.items() if target in targets]


class TaskErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool = False


class ServiceCallView(BaseModel):
    step: str
    service: str
    operation: str
    status: str
    attempts: int
    latency_ms: float | None
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None


class TaskView(BaseModel):
    id: uuid.UUID
    tenant_id: str
    session_id: uuid.UUID | None
    kind: str
    status: TaskStatus
    attempt: int
    max_attempts: int
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: TaskErrorInfo | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    service_calls: list[ServiceCallView] | None = None
