"""The one event envelope (SSE and WebSocket alike) and the streams events are kept in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from agent_orchestrator.models.task import TERMINAL


class EventType(StrEnum):
    TASK_STATUS = "task.status"
    CHAT_STREAM = "chat.stream"
    CHAT_COMPLETED = "chat.completed"
    BATCH_PROGRESS = "batch.progress"
    SESSION_STATE = "session.state"
    SYSTEM_ERROR = "system.error"
    SYSTEM_WARNING = "system.warning"
    SYSTEM_PING = "system.ping"


class Event(BaseModel):
    """`id` is a cursor: integers rising across every stream, so one id resumes anywhere."""

    id: str = ""
    type: str
    tenant_id: str
    session_id: str | None = None
    task_id: str | None = None
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def cursor(self) -> int:
        return int(self.id) if self.id else 0

    def streams(self) -> list[StreamKey]:
        if self.type == EventType.BATCH_PROGRESS:
            # A batch's own log: its items' events stay in theirs (task and session).
            return [StreamKey("batch", self.tenant_id, str(self.data["batch_id"]))]
        keys = []
        if self.task_id:
            keys.append(StreamKey("task", self.tenant_id, self.task_id))
        if self.session_id:
            keys.append(StreamKey("session", self.tenant_id, self.session_id))
        return keys


@dataclass(frozen=True, slots=True)
class StreamKey:
    """A replay log: every event of one task or one session, or the progress of one
    batch, of one tenant."""

    kind: str  # "task" | "session" | "batch"
    tenant_id: str
    resource_id: str

    def name(self, namespace: str) -> str:
        return f"{namespace}:events:{self.kind}:{self.tenant_id}:{self.resource_id}"


_TERMINAL_VALUES = frozenset(status.value for status in TERMINAL)


def ends_task_stream(event: Event) -> bool:
    """A task's terminal status: the last event its stream will ever hold."""
    return event.type == EventType.TASK_STATUS and event.data.get("status") in _TERMINAL_VALUES


#: A batch's statuses once every item has ended (models/batch.py).
BATCH_FINAL = frozenset({"completed", "cancelled"})


def ends_batch_stream(event: Event) -> bool:
    """A batch's final progress: the last event its stream will ever hold."""
    return event.type == EventType.BATCH_PROGRESS and event.data.get("status") in BATCH_FINAL


def ends_stream(event: Event) -> bool:
    """The last event of a task's or a batch's stream (each holds only its own kind)."""
    return ends_task_stream(event) or ends_batch_stream(event)


#: What a client's cursor may be, as the OpenAPI document states it: empty (none), or the
#: decimal id of an event it received.
CURSOR_PATTERN = r"^[0-9]{0,20}$"


def parse_cursor(value: str | None) -> int | None:
    """A client's cursor (Last-Event-ID, `after`): ASCII digits, else None when empty.
    (`str.isdigit` alone would take other scripts' digits and superscripts.)"""
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise ValueError("cursor must be a non-negative integer event id")
    return int(value)
