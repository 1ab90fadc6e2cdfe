"""Session states, the one table of allowed transitions, and the session API models."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent_orchestrator.errors import Conflict
from agent_orchestrator.models.storable import StorableJson, StorableText

AgentId = StorableText
Metadata = dict[str, Any]


class SessionState(StrEnum):
    ACTIVE = "active"
    PROCESSING = "processing"
    CLOSED = "closed"
    EXPIRED = "expired"


#: Allowed transitions. `expired` is entered by time passing, never by a write; an expired
#: session can still be closed (kept for history) but not resumed.
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.ACTIVE: frozenset({SessionState.PROCESSING, SessionState.CLOSED}),
    SessionState.PROCESSING: frozenset({SessionState.ACTIVE, SessionState.CLOSED}),
    SessionState.EXPIRED: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}

#: States in which the session's own fields (metadata, agent) may still change.
EDITABLE = frozenset({SessionState.ACTIVE, SessionState.PROCESSING})


def effective_state(stored: SessionState, expires_at: datetime, now: datetime) -> SessionState:
    """A live session past `expires_at` reads as expired, whatever is stored."""
    if stored in EDITABLE and expires_at <= now:
        return SessionState.EXPIRED
    return stored


def ensure_transition(current: SessionState, target: SessionState) -> None:
    if target not in TRANSITIONS[current]:
        raise Conflict(
            f"session is {current.value}; it cannot become {target.value}",
            details={"state": current.value, "requested": target.value},
        )


def ensure_editable(current: SessionState) -> None:
    if current not in EDITABLE:
        raise Conflict(
            f"session is {current.value} and can no longer be changed",
            details={"state": current.value},
        )


_STRICT = ConfigDict(extra="forbid")


class SessionCreate(BaseModel):
    model_config = _STRICT

    agent_id: AgentId | None = Field(default=None, min_length=1, max_length=128)
    metadata: StorableJson = Field(default_factory=dict)


class SessionUpdate(BaseModel):
    """Only these fields may be patched; `tenant_id`, `state`, `user_id` are refused (422)."""

    model_config = _STRICT

    agent_id: AgentId | None = Field(default=None, min_length=1, max_length=128)
    metadata: StorableJson | None = None


class Session(BaseModel):
    id: uuid.UUID
    tenant_id: str
    user_id: str
    agent_id: str | None
    state: SessionState
    metadata: Metadata
    created_at: datetime
    last_activity_at: datetime
    expires_at: datetime


class Message(BaseModel):
    id: uuid.UUID
    session_id: uuid.UUID
    role: str
    content: str
    task_id: uuid.UUID | None
    metadata: Metadata
    created_at: datetime
