"""How an HTTP client reaches its service: the lean HTTP/1.1 pool (http1.py) for a
plain-http base URL that no proxy applies to, else httpx (https, a proxy from the
environment, or a transport injected by tests). Both answer the same small interface:
`fetch` for a whole response, `stream` for a body read as it arrives."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from agent_orchestrator.clients.http1 import Http1Pool, Reply

USER_AGENT = "agent-orchestrator"


class StreamedResponse(Protocol):
    status: int
    reason: str
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...
    def iter_bytes(self) -> AsyncIterator[bytes]: ...
    def keep_connection(self) -> None: ...


class Exchange(Protocol):
    async def fetch(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> Reply: ...

    def stream(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> AbstractAsyncContextManager[StreamedResponse]: ...

    async def aclose(self) -> None: ...


def open_exchange(
    base_url: str,
    *,
    fixed_headers: Mapping[str, str],
    timeout: float,
    max_connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Exchange:
    """`target`s are relative to `base_url` (which may have a path); `fixed_headers` go
    with every request."""
    base = base_url.rstrip("/") + "/"
    connect_timeout = min(timeout, 5.0)
    parts = urlsplit(base)
    if transport is None and parts.scheme == "http" and parts.hostname and not _proxied(base):
        port = parts.port or 80
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        authority = host if port == 80 else f"{host}:{port}"
        head = f"Host: {authority}\r\nUser-Agent: {USER_AGENT}\r\nAccept-Encoding: identity\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in fixed_headers.items())
        return _Http1Exchange(
            Http1Pool(
                parts.hostname,
                port,
                head=head,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_connections=max_connections,
            ),
            prefix=parts.path,
        )
    return HttpxExchange(
        httpx.AsyncClient(
            base_url=base,
            headers=dict(fixed_headers),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )
    )


def _proxied(url: str) -> bool:
    """Whether httpx would send requests to `url` through a proxy from the environment."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get("http") or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(urlsplit(url).hostname or "")


class _Http1Exchange:
    def __init__(self, pool: Http1Pool, *, prefix: str) -> None:
        self.pool = pool
        self._prefix = prefix  # the base URL's path, ending in "/"

    async def fetch(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> Reply:
        return await self.pool.fetch(method, self._prefix + target, headers, body)

    def stream(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> AbstractAsyncContextManager[StreamedResponse]:
        return self.pool.stream(method, self._prefix + target, headers, body)

    async def aclose(self) -> None:
        await self.pool.aclose()


class HttpxExchange:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def fetch(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> Reply:
        response = await self.http.request(
            method, target, content=body, headers=_with_type(headers, body)
        )
        return Reply(
            response.status_code, response.reason_phrase, response.headers, response.content
        )

    def stream(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> AbstractAsyncContextManager[StreamedResponse]:
        return _HttpxStream(
            self.http.stream(method, target, content=body, headers=_with_type(headers, body))
        )

    async def aclose(self) -> None:
        await self.http.aclose()


def _with_type(headers: Mapping[str, str], body: bytes | None) -> dict[str, str]:
    sent = dict(headers)
    if body is not None:
        sent["Content-Type"] = "application/json"
    return sent


class _HttpxStreamed:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        return await self._response.aread()

    def iter_bytes(self) -> AsyncIterator[bytes]:
        return self._response.aiter_bytes()

    def keep_connection(self) -> None:
        return None  # httpx closes a response left unread; nothing to keep


class _HttpxStream:
    def __init__(self, context: AbstractAsyncContextManager[httpx.Response]) -> None:
        self._context = context

    async def __aenter__(self) -> StreamedResponse:
        return _HttpxStreamed(await self._context.__aenter__())

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._context.__aexit__(*exc_info)
