"""Chat API models: ChatRequest in, ChatAccepted / ChatResponse out."""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from agent_orchestrator.models.session import Message
from agent_orchestrator.models.storable import StorableJson, StorableText
from agent_orchestrator.models.task import TaskView


class ChatMode(StrEnum):
    ASYNC = "async"
    WAIT = "wait"
    STREAM = "stream"


class BusyPolicy(StrEnum):
    """What a new turn does when its session is still working on an earlier one."""

    ENQUEUE = "enqueue"  # run after it, in order
    REJECT = "reject"  # 409
    INTERRUPT = "interrupt"  # cancel it, then run


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: StorableText = Field(min_length=1, max_length=32_000)
    session_id: uuid.UUID | None = None
    agent_id: StorableText | None = Field(default=None, min_length=1, max_length=128)
    mode: ChatMode = ChatMode.ASYNC
    on_busy: BusyPolicy | None = None
    metadata: StorableJson = Field(default_factory=dict)


class ChatAccepted(BaseModel):
    task_id: uuid.UUID
    session_id: uuid.UUID
    status: str
    events_url: str


class ChatResponse(BaseModel):
    task: TaskView
    message: Message | None
