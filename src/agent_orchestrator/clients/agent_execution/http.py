"""Agent execution over HTTP: POST /v1/executions answers an SSE stream. Closing the
iterator closes the connection, which cancels the execution downstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import ValidationError

from agent_orchestrator.clients.agent_execution import conversation_of
from agent_orchestrator.clients.base import (
    CallContext,
    DownstreamError,
    HttpServiceClient,
    invalid_response,
    json_bytes,
    json_object,
    sse_data,
)
from agent_orchestrator.clients.exchange import Reply
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
        started = False  # the response began: a transport failure from now on is a cut
        try:
            async with self.exchange.stream(
                "POST", "v1/executions", self.headers(ctx), json_bytes(body)
            ) as response:
                started = True
                if response.status != 200:
                    content = await response.read()
                    raise self.error_from(
                        Reply(response.status, response.reason, response.headers, content)
                    )
                async for payload in sse_data(response.iter_bytes()):
                    event = self._event(json_object(self.service, payload), agent)
                    if event is None:
                        continue
                    if isinstance(event, ReplyDone):
                        # `done` is the stream's last event: the body ends right after
                        # it, so the connection can serve the next call.
                        response.keep_connection()
                        yield event
                        return
                    yield event
        except TimeoutError as error:
            raise DownstreamError(
                self.service, "timeout", "execution timed out", retryable=True
            ) from error
        except ValueError as error:
            if started:
                raise
            # A body or header that cannot be sent as it is (as request() maps it).
            raise DownstreamError(
                self.service, "invalid_request", str(error), retryable=False
            ) from error
        except aiohttp.ClientError as error:
            if not started:
                raise DownstreamError(
                    self.service, "unreachable", str(error) or "connect error", retryable=True
                ) from error
            raise DownstreamError(
                self.service, "stream_cut", f"connection broke: {error}", retryable=True
            ) from error
        raise DownstreamError(
            self.service, "stream_cut", "stream ended without `done`", retryable=True
        )

    def _event(self, event: dict[str, Any], agent: AgentConfig) -> ExecutionEvent | None:
        """The event as ours; None for an event type this client does not know (ignored,
        like unknown fields); an `error` event raises its error."""
        kind = event.get("type")
        try:
            if kind == "chunk":
                return ReplyChunk.model_validate(
                    {"content": event.get("content"), "index": event.get("index")}
                )
            if kind == "done":
                return ReplyDone(
                    usage=Usage.model_validate(event.get("usage") or {}),
                    finish_reason=str(event.get("finish_reason") or "stop"),
                    model=agent.model,
                )
        except ValidationError as error:
            raise invalid_response(self.service, f"bad `{kind}` event") from error
        if kind == "error":
            raise DownstreamError(
                self.service,
                str(event.get("code") or "execution_failed"),
                str(event.get("message") or "execution failed"),
                retryable=bool(event.get("retryable")),
            )
        return None
