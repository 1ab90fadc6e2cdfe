"""What every downstream client shares: the call context, the error type, and the pooled
HTTP plumbing (headers, timeouts, error mapping, Retry-After, SSE reading; the aiohttp
session itself is in exchange.py).

The contract is in docs/contracts/README.md; retries and circuit breaking are the
coordinator's job (resilience/), so a client makes exactly one attempt per call.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
from pydantic import BaseModel, ValidationError

from agent_orchestrator.clients.exchange import Exchange, Reply
from agent_orchestrator.models.storable import repaired_json, strict_json
from agent_orchestrator.observability.trace_context import new_traceparent

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class CallContext:
    """Who a downstream call acts for, and how to find it in logs and traces."""

    tenant_id: str
    correlation_id: str | None = None
    session_id: str | None = None
    task_id: str | None = None
    traceparent: str = field(default_factory=lambda: new_traceparent())


class DownstreamError(Exception):
    """A failed downstream call, classified: `retryable` follows the contract's table."""

    def __init__(
        self,
        service: str,
        code: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{service}: {code}: {message}")
        self.service = service
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


def retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def segment(value: str) -> str:
    """An id as one path segment: ids are opaque strings, so `/`, `?` or `#` in one must
    not change the path."""
    return quote(value, safe="")


def invalid_response(service: str, message: str, *, status: int | None = None) -> DownstreamError:
    """A body that is not the contract's shape: a contract violation, never retried."""
    return DownstreamError(service, "invalid_response", message, retryable=False, status=status)


class HttpServiceClient:
    """One pooled connection set per downstream service (exchange.py)."""

    service = "unknown"

    def __init__(
        self,
        base_url: str,
        service_token: str | None,
        *,
        timeout: float = 10.0,
        max_connections: int = 100,
    ) -> None:
        self.exchange = Exchange(
            base_url,
            fixed_headers={"Authorization": f"Bearer {service_token}"} if service_token else {},
            timeout=timeout,
            max_connections=max_connections,
        )

    async def aclose(self) -> None:
        await self.exchange.aclose()

    def headers(self, ctx: CallContext) -> dict[str, str]:
        """The per-call headers (the service token goes with every request already)."""
        headers = {"traceparent": ctx.traceparent}
        if ctx.tenant_id:  # every call but introspection, which asks whose the token is
            headers["X-Tenant-ID"] = ctx.tenant_id
        if ctx.correlation_id:
            headers["X-Correlation-ID"] = ctx.correlation_id
        return headers

    async def request(
        self,
        ctx: CallContext,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> Any:
        """One attempt; with `idempotency_key`, an `Idempotency-Key` header goes too."""
        sent = self.headers(ctx)
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        target = path.lstrip("/")
        if params:
            target += "?" + urlencode(params)
        try:
            body = None if json_body is None else json_bytes(json_body)
            reply = await self.exchange.fetch(method, target, sent, body)
        except TimeoutError as error:  # connect, pool wait or read (aiohttp's included)
            raise DownstreamError(
                self.service, "timeout", str(error) or "timed out", retryable=True
            ) from error
        except aiohttp.ClientError as error:
            raise DownstreamError(
                self.service, "unreachable", str(error) or "connect error", retryable=True
            ) from error
        except ValueError as error:  # a body or header that cannot be sent as it is
            raise DownstreamError(
                self.service, "invalid_request", str(error), retryable=False
            ) from error
        if reply.status not in ok:
            raise self.error_from(reply)
        try:
            return downstream_json(reply.body)
        except ValueError as error:
            raise invalid_response(self.service, "body is not JSON", status=reply.status) from error

    def parse(self, model: type[ModelT], body: Any, message: str) -> ModelT:
        """The body as the contract's `model`; any other shape is `invalid_response`."""
        try:
            return model.model_validate(body)
        except ValidationError as error:
            raise invalid_response(self.service, message) from error

    def error_from(self, reply: Reply) -> DownstreamError:
        status = reply.status
        code, message = f"http_{status}", reply.reason or "error"
        try:
            body = downstream_json(reply.body)
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                code = str(error.get("code") or code)
                message = str(error.get("message") or message)
        except ValueError:
            pass
        return DownstreamError(
            self.service,
            code,
            message,
            retryable=retryable_status(status),
            status=status,
            retry_after=parse_retry_after(reply.headers.get("retry-after")),
        )


#: JSON escapes of what no database here can store: NUL, and UTF-16 surrogates (a pair is
#: fine once decoded, a lone one is not; telling them apart is left to the repair).
_UNSTORABLE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_UNSTORABLE_BYTES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def downstream_json(raw: str | bytes) -> Any:
    """A downstream service's JSON, decoded and made storable (models/storable.py). JSON
    can only carry those characters as escapes, so a body without one is left alone.
    NaN, Infinity and numbers beyond a double are not JSON (Python's reader would take
    them, and PostgreSQL's jsonb would then refuse the step's record): ValueError."""
    value = strict_json(raw)
    found = _UNSTORABLE_BYTES.search(raw) if isinstance(raw, bytes) else _UNSTORABLE.search(raw)
    return repaired_json(value) if found else value


def json_bytes(value: Any) -> bytes:
    """A compact UTF-8 JSON request body (NaN refused: ValueError)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The `data:` payloads of a text/event-stream body, one event at a time. Lines end
    with CRLF, LF or CR (the SSE rule, not str.splitlines', which also splits on
    characters a JSON string may hold)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    buffer: list[str] = []
    rest = ""
    final = False
    iterator = aiter(chunks)
    while not final:
        try:
            text = rest + decoder.decode(await anext(iterator))
        except StopAsyncIteration:
            text, final = rest + decoder.decode(b"", final=True), True
        held = not final and text.endswith("\r")  # maybe the first half of a CRLF
        *lines, rest = _LINE_END.split(text[:-1] if held else text)
        if final and rest:
            lines.append(rest)
        elif held:
            rest += "\r"
        for line in lines:
            if line == "":
                if buffer:
                    yield "\n".join(buffer)
                    buffer = []
            elif line.startswith("data:"):
                buffer.append(line[5:].lstrip(" "))
    if buffer:
        yield "\n".join(buffer)


def json_object(service: str, payload: str) -> dict[str, Any]:
    try:
        value = downstream_json(payload)
    except ValueError as error:
        raise DownstreamError(
            service, "invalid_response", "stream event is not JSON", retryable=False
        ) from error
    if not isinstance(value, dict):
        raise DownstreamError(
            service, "invalid_response", "stream event is not an object", retryable=False
        )
    return value
