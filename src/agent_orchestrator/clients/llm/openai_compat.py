"""Any OpenAI-compatible Chat Completions endpoint, streaming (OpenAI, Ollama, vLLM,
llama.cpp server). Errors map onto the contract's classification; a stream that ends
without `[DONE]` is a cut stream, never a complete reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from agent_orchestrator.clients.base import (
    DownstreamError,
    downstream_json,
    json_bytes,
    json_object,
    parse_retry_after,
    retryable_status,
    sse_data,
)
from agent_orchestrator.clients.exchange import Exchange, Reply
from agent_orchestrator.models.agent import ExecutionEvent, ReplyChunk, ReplyDone, Usage

SERVICE = "llm"

_CODES = {
    401: "llm_unauthorized",
    403: "llm_forbidden",
    404: "llm_model_not_found",
    429: "llm_rate_limited",
}


class OpenAICompatibleLLM:
    name = "openai-compatible"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        default_model: str,
        timeout: float = 60.0,
    ) -> None:
        self.default_model = default_model
        self.exchange = Exchange(
            base_url,
            fixed_headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=timeout,
            max_connections=100,
        )

    async def aclose(self) -> None:
        await self.exchange.aclose()

    async def stream(
        self, messages: list[dict[str, Any]], *, model: str | None, temperature: float | None
    ) -> AsyncIterator[ExecutionEvent]:
        body: dict[str, Any] = {
            "model": model or self.default_model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            body["temperature"] = temperature
        started = False  # the response began: a transport failure from now on is a cut
        try:
            async with self.exchange.stream(
                "POST", "chat/completions", {}, json_bytes(body)
            ) as response:
                started = True
                if response.status != 200:
                    content = await response.read()
                    raise _error_from(
                        Reply(response.status, response.reason, response.headers, content)
                    )
                async for event in _events(response.iter_bytes(), body["model"]):
                    if isinstance(event, ReplyDone):
                        response.keep_connection()  # [DONE] ends the body: reuse it
                    yield event
        except TimeoutError as error:
            raise DownstreamError(
                SERVICE, "llm_timeout", "the model did not answer in time", retryable=True
            ) from error
        except ValueError as error:
            if started:
                raise
            # A request body that cannot be sent (a NaN temperature, say).
            raise DownstreamError(
                SERVICE, "invalid_request", str(error), retryable=False
            ) from error
        except aiohttp.ClientError as error:
            # Before the response this is a connect failure; after it, a cut stream.
            if not started:
                raise DownstreamError(
                    SERVICE, "llm_unreachable", f"cannot reach the model: {error}", retryable=True
                ) from error
            raise DownstreamError(
                SERVICE, "llm_stream_cut", f"connection to the model broke: {error}", retryable=True
            ) from error


async def _events(body: AsyncIterator[bytes], model: str) -> AsyncIterator[ExecutionEvent]:
    index = 0
    usage = Usage()
    finish = "stop"
    async for payload in sse_data(body):
        if payload.strip() == "[DONE]":
            yield ReplyDone(usage=usage, finish_reason=finish, model=model)
            return
        event = json_object(SERVICE, payload)
        if isinstance(event.get("error"), dict):
            error = event["error"]
            raise DownstreamError(
                SERVICE, "llm_error", str(error.get("message", "error")), retryable=True
            )
        try:
            if isinstance(event.get("usage"), dict):
                usage = Usage(
                    prompt_tokens=int(event["usage"].get("prompt_tokens") or 0),
                    completion_tokens=int(event["usage"].get("completion_tokens") or 0),
                )
            pieces: list[str] = []
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    pieces.append(str(content))
                if choice.get("finish_reason"):
                    finish = str(choice["finish_reason"])
        except (AttributeError, TypeError, ValueError) as error:
            raise DownstreamError(
                SERVICE, "invalid_response", f"not a completion chunk: {error}", retryable=False
            ) from error
        for content in pieces:
            yield ReplyChunk(content=content, index=index)
            index += 1
    raise DownstreamError(
        SERVICE, "llm_stream_cut", "the model's stream ended before [DONE]", retryable=True
    )


def _error_from(reply: Reply) -> DownstreamError:
    status = reply.status
    message = reply.reason or "error"
    try:
        body = downstream_json(reply.body)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message") or message)
    except ValueError:
        pass
    code = _CODES.get(status, "llm_unavailable" if status >= 500 else f"llm_http_{status}")
    return DownstreamError(
        SERVICE,
        code,
        message,
        retryable=retryable_status(status),
        status=status,
        retry_after=parse_retry_after(reply.headers.get("retry-after")),
    )
