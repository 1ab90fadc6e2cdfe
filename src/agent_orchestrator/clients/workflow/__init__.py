"""Workflow engine: named workflows run asynchronously (docs/contracts/workflow-engine.md)."""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import BaseModel

from agent_orchestrator.clients.base import CallContext

RunStatus = Literal["queued", "running", "succeeded", "failed"]


class RunError(BaseModel):
    code: str = ""
    message: str = ""


class WorkflowRun(BaseModel):
    run_id: str
    status: RunStatus
    #: The workflow's result when `succeeded`, else None.
    output: dict[str, Any] | None = None
    #: May accompany a failed run.
    error: RunError | None = None

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


class WorkflowClient(Protocol):
    async def start(
        self,
        ctx: CallContext,
        *,
        workflow_id: str,
        input: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> WorkflowRun:
        """Starts a run; with `idempotency_key`, a repeat returns the original run."""
        ...

    async def status(self, ctx: CallContext, *, run_id: str) -> WorkflowRun: ...
