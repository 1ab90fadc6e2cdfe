"""Workflow engine over HTTP: POST /v1/workflows/{workflow_id}/runs, GET /v1/runs/{run_id}."""

from __future__ import annotations

from typing import Any

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    segment,
)
from agent_orchestrator.clients.workflow import WorkflowRun


class HttpWorkflowClient(HttpServiceClient):
    service = "workflow"

    async def start(
        self,
        ctx: CallContext,
        *,
        workflow_id: str,
        input: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> WorkflowRun:
        body = await self.request(
            ctx,
            "POST",
            f"v1/workflows/{segment(workflow_id)}/runs",
            json_body={"input": input},
            idempotency_key=idempotency_key,
        )
        return self.parse(WorkflowRun, body, "not a workflow run")

    async def status(self, ctx: CallContext, *, run_id: str) -> WorkflowRun:
        body = await self.request(ctx, "GET", f"v1/runs/{segment(run_id)}")
        return self.parse(WorkflowRun, body, "not a workflow run")
