"""Workflow engine over HTTP: POST /v1/workflows/{workflow_id}/runs, GET /v1/runs/{run_id}."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    invalid_response,
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
            headers={"Idempotency-Key": idempotency_key} if idempotency_key else None,
        )
        return self._run(body)

    async def status(self, ctx: CallContext, *, run_id: str) -> WorkflowRun:
        return self._run(await self.request(ctx, "GET", f"v1/runs/{segment(run_id)}"))

    def _run(self, body: Any) -> WorkflowRun:
        try:
            return WorkflowRun.model_validate(body)
        except ValidationError as error:
            raise invalid_response(self.service, "not a workflow run") from error
