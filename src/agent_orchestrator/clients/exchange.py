"""How an HTTP client reaches its service: one aiohttp.ClientSession per downstream
service, with its own keep-alive pool. It answers a small interface: `fetch` for a whole
response, `stream` for a body read as it arrives.

Why aiohttp: its C parser and single-task request path cost ~190 us of CPU per call
against ~870 us through httpx (httpcore, h11 and anyio), and a chat turn makes five.
Failures surface as aiohttp's types: `TimeoutError` for a timeout (connect, pool wait or
read), `aiohttp.ClientError` for anything else on the wire; callers map both.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

USER_AGENT = "agent-orchestrator"
#: A stream whose caller got its end event may take this long to end its body (normally
#: already on its way) and leave the connection for the next call; else it is closed.
LINGER_SECONDS = 1.0

# aiohttp refuses CR and LF in a header value; the other control characters would go out
# as they are, and no downstream expects them.
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(slots=True)
class Reply:
    """A whole response: status, reason phrase, headers (looked up in any case), body."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


class StreamedResponse(Protocol):
    status: int
    reason: str
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...
    def iter_bytes(self) -> AsyncIterator[bytes]: ...
    def keep_connection(self) -> None: ...


class Exchange:
    """`target`s are relative to `base_url` (which may have a path); `fixed_headers` go
    with every request. `timeout` bounds the wait for a pooled connection and each read
    (the next bytes of a body, not the whole of it); connecting gets at most 5 s of it."""

    def __init__(
        self,
        base_url: str,
        *,
        fixed_headers: Mapping[str, str],
        timeout: float,
        max_connections: int,
    ) -> None:
        self._base = base_url.rstrip("/") + "/"
        self._headers = {
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",  # JSON and SSE, mostly small: not worth inflating
            **fixed_headers,
        }
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=min(timeout, 5.0), sock_read=timeout
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._finishing: set[asyncio.Task[None]] = set()

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop, and clients are
        # built before it runs in some entry points.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                headers=self._headers,
                timeout=self._timeout,
                proxy=environment_proxy(self._base),
                # Never keep a downstream's cookies: the session serves every tenant.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _send(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> aiohttp.ClientResponse:
        for name, value in headers.items():
            if _UNSAFE_VALUE.search(value):
                raise ValueError(f"header {name} has a control character")
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        # The target is already encoded (clients quote ids and encode queries).
        url = URL(self._base + target, encoded=True)
        return await self._client().request(method, url, headers=headers, data=body)

    async def fetch(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> Reply:
        response = await self._send(method, target, headers, body)
        try:
            content = await response.read()
        finally:
            response.release()  # the whole body was read: the connection is reused
        return Reply(response.status, response.reason or "", response.headers, content)

    @asynccontextmanager
    async def stream(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> AsyncIterator[StreamedResponse]:
        response = await self._send(method, target, headers, body)
        streamed = _Streamed(response)
        try:
            yield streamed
        except BaseException:
            response.close()  # a failure or a cancelled reader: drop the connection now
            raise
        if streamed.keep and not response.content.at_eof():
            task = asyncio.get_running_loop().create_task(_finish(response))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        else:
            # Reused if the body was read to its end, else closed (its state is unknown).
            response.release()

    async def aclose(self) -> None:
        for task in list(self._finishing):
            task.cancel()
        if self._session is not None:
            await self._session.close()


def environment_proxy(url: str) -> str | None:
    """The proxy that HTTP_PROXY / HTTPS_PROXY / ALL_PROXY name for `url`, unless NO_PROXY
    exempts its host. Read once per session, as httpx did: aiohttp's `trust_env` reads
    the environment (and ~/.netrc) on every request, ~300 us of CPU each."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class _Streamed:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: Mapping[str, str] = response.headers
        self.keep = False

    async def read(self) -> bytes:
        return await self._response.read()

    def iter_bytes(self) -> AsyncIterator[bytes]:
        return self._response.content.iter_any()

    def keep_connection(self) -> None:
        """What the caller needed has arrived (the reply's end event): the connection may
        be reused once the rest of the body comes, instead of being closed on exit."""
        self.keep = True


async def _finish(response: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while await response.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError):
        response.close()
    except asyncio.CancelledError:  # the client is closing
        response.close()
        raise
    else:
        response.release()
