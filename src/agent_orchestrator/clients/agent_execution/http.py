"""Agent execution over HTTP: POST /v1/executions answers an SSE stream. Closing the
iterator closes the connection, which cancels the execution downstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from agent_orchestrator.clients.agent_execution import conversation_of
from agent_orchestrator.clients.base import (
    CallContext,
    DownstreamError,
    HttpServiceClient,
    json_object,
    sse_data,
)
from agent_orchestrator.models.agent import (
    AgentConfig,
    ConversationMessage,
    ExecutionEvent,
    ReplyChunk,
    ReplyDone,
    Source,
    Usage,
)


class HttpAgentExecutionClient(HttpServiceClient):
    service = "agent_execution"

    async def execute(
        self,
        ctx: CallContext,
        *,
        agent: AgentConfig,
        history: list[ConversationMessage] | None,
        message: str,
        sources: list[Source] | None,
    ) -> AsyncIterator[ExecutionEvent]:
        body = {
            "agent": agent.model_dump(),
            "messages": [
                {"role": m.role, "content": m.content} for m in conversation_of(history, message)
            ],
            "context": {"sources": [s.model_dump() for s in sources or []]},
            "stream": True,
        }
        try:
            async with self.http.stream(
                "POST", "v1/executions", json=body, headers=self.headers(ctx)
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self.error_from(response)
                async for payload in sse_data(response):
                    event = json_object(self.service, payload)
                    kind = event.get("type")
                    if kind == "chunk":
                        yield ReplyChunk(
                            content=str(event.get("content", "")), index=int(event.get("index", 0))
                        )
                    elif kind == "done":
                        yield ReplyDone(
                            usage=Usage.model_validate(event.get("usage") or {}),
                            finish_reason=str(event.get("finish_reason") or "stop"),
                            model=agent.model,
                        )
                        return
                    elif kind == "error":
                        raise DownstreamError(
                            self.service,
                            str(event.get("code") or "execution_failed"),
                            str(event.get("message") or "execution failed"),
                            retryable=bool(event.get("retryable")),
                        )
        except httpx.TimeoutException as error:
            raise DownstreamError(
                self.service, "timeout", "execution timed out", retryable=True
            ) from error
        except httpx.TransportError as error:
            raise DownstreamError(
                self.service, "stream_cut", f"connection broke: {error}", retryable=True
            ) from error
        raise DownstreamError(
            self.service, "stream_cut", "stream ended without `done`", retryable=True
        )
