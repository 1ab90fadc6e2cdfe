"""What every downstream client shares: the call context, the error type, and the pooled
HTTP plumbing (headers, timeouts, error mapping, Retry-After, SSE reading).

The contract is in docs/contracts/README.md; retries and circuit breaking are the
coordinator's job (resilience/), so a client makes exactly one attempt per call.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx


@dataclass(frozen=True)
class CallContext:
    """Who a downstream call acts for, and how to find it in logs and traces."""

    tenant_id: str
    correlation_id: str | None = None
    session_id: str | None = None
    task_id: str | None = None
    traceparent: str = field(default_factory=lambda: new_traceparent())


def new_traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


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
    """One pooled httpx client per downstream service."""

    service = "unknown"

    def __init__(
        self,
        base_url: str,
        service_token: str | None,
        *,
        timeout: float = 10.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._token = service_token
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"X-Tenant-ID": ctx.tenant_id, "traceparent": ctx.traceparent}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
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
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> Any:
        """One attempt; `headers` adds to the common ones (e.g. `Idempotency-Key`)."""
        sent = self.headers(ctx)
        if headers:
            sent.update(headers)
        try:
            response = await self.http.request(
                method, path.lstrip("/"), json=json_body, params=params, headers=sent
            )
        except httpx.TimeoutException as error:
            raise DownstreamError(
                self.service, "timeout", str(error) or "timed out", retryable=True
            ) from error
        except httpx.TransportError as error:
            raise DownstreamError(
                self.service, "unreachable", str(error) or "connect error", retryable=True
            ) from error
        if response.status_code not in ok:
            raise self.error_from(response)
        try:
            return response.json()
        except ValueError as error:
            raise invalid_response(
                self.service, "body is not JSON", status=response.status_code
            ) from error

    def error_from(self, response: httpx.Response) -> DownstreamError:
        status = response.status_code
        code, message = f"http_{status}", response.reason_phrase or "error"
        try:
            body = response.json()
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
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a text/event-stream response, one event at a time."""
    buffer: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if buffer:
                yield "\n".join(buffer)
                buffer = []
            continue
        if line.startswith(":"):
            continue
        if line.startswith("data:"):
            buffer.append(line[5:].lstrip(" "))
    if buffer:
        yield "\n".join(buffer)


def json_object(service: str, payload: str) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError as error:
        raise DownstreamError(
            service, "invalid_response", "stream event is not JSON", retryable=False
        ) from error
    if not isinstance(value, dict):
        raise DownstreamError(
            service, "invalid_response", "stream event is not an object", retryable=False
        )
    return value
