"""Agent configuration and the conversation shapes passed between plan steps."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Knowledge(BaseModel):
    collection_ids: list[str] = Field(default_factory=list)
    top_k: int = Field(default=4, ge=1, le=50)


class AgentConfig(BaseModel):
    id: str
    name: str = ""
    system_prompt: str = ""
    model: str | None = None
    temperature: float | None = None
    knowledge: Knowledge | None = None
    tools: list[str] = Field(default_factory=list)
    #: Downstream services this agent cannot work without (names as in docs/contracts).
    requires: list[str] = Field(default_factory=list)


Role = Literal["user", "assistant", "system", "tool"]


class ConversationMessage(BaseModel):
    role: Role
    content: str
    id: str | None = None


class Source(BaseModel):
    title: str = ""
    url: str | None = None
    snippet: str = ""
    score: float | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ReplyChunk(BaseModel):
    content: str
    index: int


class ReplyDone(BaseModel):
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str = "stop"
    model: str | None = None


ExecutionEvent = ReplyChunk | ReplyDone
