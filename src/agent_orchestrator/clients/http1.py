"""Keep-alive HTTP/1.1 connections to one plain-http downstream origin, on asyncio itself.

Why not httpx here: through httpx, httpcore, h11 and anyio a downstream request cost about
600 us of CPU (a chat turn makes five); this costs about 100 us. A request goes out as one
write, the response is parsed by httptools (C) in the protocol's data callback, and each
wait is one future and one timer. It does only what the downstream clients need: one
origin, Content-Length, chunked or read-to-close bodies, keep-alive. Failures are raised
as httpx's exception types, so callers map both transports' failures alike (exchange.py
picks the transport; https, proxies and injected transports stay on httpx).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import httptools
import httpx

#: A connection whose reader stopped at the reply's end event waits this long for the
#: rest of its body (the end of a chunked body, normally already on its way) to be reused.
LINGER_SECONDS = 1.0
#: Unread body bytes a streamed response buffers before its socket stops being read
#: (a whole-body read takes everything: its caller wants it all anyway).
HIGH_WATER = 1 << 20

_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")


@dataclass(slots=True)
class Reply:
    """A whole response: status, reason phrase, headers (names in lower case), body."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("timed out waiting for the response"))


class _Connection(asyncio.Protocol):
    """One socket; the httptools parser calls back into it as response bytes arrive."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.busy = False  # a request was sent and its response is still wanted
        self.lingering: asyncio.TimerHandle | None = None
        self.reset()

    def reset(self) -> None:
        """Fresh state for the next response on this connection."""
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.buffered = 0
        self.streaming = False  # read piece by piece: back-pressure on the socket
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error: Exception | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.lingering is None:
            self.close()  # bytes nobody asked for: the framing can no longer be trusted
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.error = httpx.RemoteProtocolError(f"malformed response: {error}")
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.lingering is not None:
            self.lingering.cancel()
        if not self.complete and self.error is None:
            if self.head_done and self._until_close():
                self.complete = True  # a body without a length ends with the connection
            elif exc is not None:
                self.error = httpx.ReadError(str(exc) or type(exc).__name__)
            else:
                self.error = httpx.RemoteProtocolError(
                    "the server closed the connection before the response was complete"
                )
        self._wake()

    # --- httptools callbacks --------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if self.lingering is not None:
            return  # nobody reads it any more
        self.body.append(body)
        self.buffered += len(body)
        if self.streaming and self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.reset()
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
            self.pool.release(self)

    # --- used by the pool -----------------------------------------------------------------
    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.reset()
        self.busy = True
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def linger(self) -> None:
        """The reader is done: reuse the connection once its body ends, if it soon does."""
        if self.reusable():
            self.pool.release(self)
        elif self.error is None and not self.closed:
            self.body.clear()
            self.lingering = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)
        else:
            self.close()

    def headers(self) -> dict[str, str]:
        return {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in self.raw_headers
        }

    async def head(self, read_timeout: float) -> None:
        while not self.head_done:
            self._check()
            await self._wait(read_timeout)

    async def whole_body(self, read_timeout: float) -> bytes:
        while not self.complete:
            self._check()
            await self._wait(read_timeout)
        return b"".join(self.body)

    async def next_piece(self, read_timeout: float) -> bytes | None:
        """Body bytes received since the last call (waiting for some); None at its end."""
        self.streaming = True
        while not self.body:
            if self.complete:
                return None
            self._check()
            await self._wait(read_timeout)
        piece = b"".join(self.body) if len(self.body) > 1 else self.body[0]
        self.body.clear()
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.resume_reading()  # it was paused at the high-water mark
        self.buffered = 0
        return piece

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise httpx.RemoteProtocolError("the connection is closed")

    async def _wait(self, read_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _until_close(self) -> bool:
        names = {name.lower() for name, _ in self.raw_headers}
        return b"content-length" not in names and b"transfer-encoding" not in names


class Http1Stream:
    """A response whose body is read as it arrives (`iter_bytes`) or whole (`read`)."""

    def __init__(self, connection: _Connection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self.status = connection.status
        self.reason = connection.reason.decode("latin-1")
        self.headers: Mapping[str, str] = connection.headers()
        self.keep = False

    async def read(self) -> bytes:
        return await self._connection.whole_body(self._timeout)

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        while (piece := await self._connection.next_piece(self._timeout)) is not None:
            yield piece

    def keep_connection(self) -> None:
        """What the caller needed has arrived (the reply's end event): the connection may
        be reused once the rest of the body comes, instead of being closed on exit."""
        self.keep = True


class _StreamContext:
    def __init__(self, pool: Http1Pool, request: bytes) -> None:
        self._pool = pool
        self._request = request
        self._stream: Http1Stream | None = None

    async def __aenter__(self) -> Http1Stream:
        await self._pool.acquire_slot()
        try:
            connection = await self._pool.start(self._request)
        except BaseException:
            self._pool.release_slot()
            raise
        self._stream = Http1Stream(connection, self._pool.timeout)
        return self._stream

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stream, self._stream = self._stream, None
        self._pool.release_slot()
        if stream is None:
            return
        connection = stream._connection
        if stream.keep:
            connection.linger()
        elif kind is None and connection.complete:
            self._pool.release(connection)
        else:
            connection.close()  # unread body or a failure: the connection's state is unknown


class Http1Pool:
    """Connections to one origin: idle ones are reused (most recent first), at most
    `max_connections` requests run at once, and a request that finds its reused connection
    closed by the server before any answer is sent once more on a new one."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        head: str,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._head = head  # the request lines every request shares (Host, ...)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    def request_bytes(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> bytes:
        """The request, head and body, as one buffer (ValueError for a target or header
        value that would break the framing)."""
        if _UNSAFE_TARGET.search(target):
            raise ValueError(f"unsafe request target {target!r}")
        parts = [f"{method} {target} HTTP/1.1\r\n", self._head]
        for name, value in headers.items():
            if _UNSAFE_VALUE.search(value):
                raise ValueError(f"header {name} has a control character")
            parts.append(f"{name}: {value}\r\n")
        if body is not None:
            parts.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        elif method in ("POST", "PUT", "PATCH"):
            parts.append("Content-Length: 0\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("ascii")
        return head + body if body else head

    async def fetch(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> Reply:
        request = self.request_bytes(method, target, headers, body)
        await self.acquire_slot()
        try:
            connection = await self.start(request)
            try:
                content = await connection.whole_body(self.timeout)
            except BaseException:
                connection.close()
                raise
            reply = Reply(
                connection.status,
                connection.reason.decode("latin-1"),
                connection.headers(),
                content,
            )
            self.release(connection)
            return reply
        finally:
            self.release_slot()

    def stream(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> _StreamContext:
        return _StreamContext(self, self.request_bytes(method, target, headers, body))

    async def aclose(self) -> None:
        self._closed = True
        for connection in list(self._open):
            connection.close()
        self._idle.clear()

    # --- for the connections and streams --------------------------------------------------
    async def acquire_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection became free in time") from None

    def release_slot(self) -> None:
        self._slots.release()

    async def start(self, request: bytes) -> _Connection:
        """Sends the request; returns its connection once the response head is in."""
        connection, reused = await self._connection()
        try:
            connection.send(request)
            await connection.head(self.timeout)
            return connection
        except (httpx.RemoteProtocolError, httpx.ReadError):
            connection.close()
            if not reused or connection.received:
                raise
        except BaseException:
            connection.close()
            raise
        # The server closed the idle connection as it was being reused (its keep-alive
        # timeout): nothing of the request was answered, so it goes once more, on a new one.
        connection = await self._connect()
        try:
            connection.send(request)
            await connection.head(self.timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    def release(self, connection: _Connection) -> None:
        connection.busy = False
        if connection.reusable() and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: _Connection) -> None:
        self._open.discard(connection)

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection, True
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as error:
            raise httpx.ConnectError(str(error) or type(error).__name__) from error
        self._open.add(connection)
        return connection
