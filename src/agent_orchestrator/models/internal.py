"""Models of `/internal/v1`: what other platform services send and read."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent_orchestrator.models.session import Message, Session
from agent_orchestrator.models.storable import StorableJson

#: Event types the service itself publishes: a caller of /internal may not forge them.
RESERVED_EVENT_PREFIXES = ("task.", "chat.", "batch.", "session.", "system.")
_RESERVED_PATTERN = "^(" + "|".join(p.rstrip(".") for p in RESERVED_EVENT_PREFIXES) + r")\."


class ServiceEvent(BaseModel):
    """An event a service publishes to a session (and, with `task_id`, to that task)."""

    model_config = ConfigDict(extra="forbid")

    #: dotted, lower case, such as `workflow.progress`; not a type the service publishes
    type: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){1,3}$",
        json_schema_extra={"not": {"pattern": _RESERVED_PATTERN}},
    )
    data: StorableJson = Field(default_factory=dict)
    #: a task of the session the event is about
    task_id: uuid.UUID | None = None

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith(RESERVED_EVENT_PREFIXES):
            raise ValueError(f"{value!r} is a type the service publishes itself")
        return value


class ServiceEventAccepted(BaseModel):
    #: the event's id (its cursor); for a repeated Idempotency-Key, the first request's
    id: str
    #: true when the request repeated an earlier one and published nothing
    duplicate: bool


class SessionContext(BaseModel):
    session: Session
    #: the last messages, oldest first
    messages: list[Message]
