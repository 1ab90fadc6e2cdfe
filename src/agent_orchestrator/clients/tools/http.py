"""Tool registry over HTTP: GET /v1/tools, POST /v1/tools/{tool_id}/invoke."""

from __future__ import annotations

import builtins
from typing import Any

from pydantic import BaseModel

from agent_orchestrator.clients.base import (
    CallContext,
    HttpServiceClient,
    invalid_response,
    segment,
)
from agent_orchestrator.clients.tools import Tool


class _ToolList(BaseModel):
    tools: builtins.list[Tool]


class HttpToolsClient(HttpServiceClient):
    service = "tools"

    async def list(self, ctx: CallContext) -> builtins.list[Tool]:
        body = await self.request(ctx, "GET", "v1/tools")
        return self.parse(_ToolList, body, "not a tool list").tools

    async def invoke(self, ctx: CallContext, *, tool_id: str, arguments: dict[str, Any]) -> Any:
        body = await self.request(
            ctx, "POST", f"v1/tools/{segment(tool_id)}/invoke", json_body={"arguments": arguments}
        )
        if not isinstance(body, dict) or "result" not in body:
            raise invalid_response(self.service, "no `result` in the answer")
        return body["result"]
