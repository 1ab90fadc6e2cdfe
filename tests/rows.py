"""Rows for data-layer tests: a session and a chat task of it, built as the service
builds them (RowCodec.new), with any column overridden."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from agent_orchestrator.db.repositories.sessions import SESSIONS
from agent_orchestrator.db.repositories.tasks import TASKS
from agent_orchestrator.db.tables import SessionRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.ids import new_id


def session_row(tenant_id: str, **overrides: Any) -> SessionRow:
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id(),
        "tenant_id": tenant_id,
        "user_id": "user-1",
        "agent_id": "default",
        "state": "active",
        "metadata_": {},
        "created_at": now,
        "last_activity_at": now,
        "expires_at": now + timedelta(hours=1),
        "closed_at": None,
    }
    return SESSIONS.new(**{**values, **overrides})


def chat_task(session: SessionRow, **overrides: Any) -> TaskRow:
    """A queued chat turn of `session`."""
    values = {"user_id": session.user_id, "session_id": session.id, **overrides}
    return task_row(session.tenant_id, **values)


def task_row(tenant_id: str, **overrides: Any) -> TaskRow:
    """A queued chat task (of no session unless `session_id` is given)."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id(),
        "tenant_id": tenant_id,
        "user_id": "user-1",
        "kind": "chat",
        "queue": "interactive",
        "status": "queued",
        "attempt": 0,
        "max_attempts": 3,
        "delivery": 1,
        "progress": {},
        "input": {"message": "hello"},
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
    }
    return TASKS.new(**{**values, **overrides})
