"""The downstream clients' aiohttp exchange (clients/exchange.py) against a scripted raw
socket server: keep-alive, body framings, header safety, base paths, environment proxies,
prompt closing of a cancelled stream, and SSE line endings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from agent_orchestrator.clients.base import CallContext, DownstreamError, sse_data
from agent_orchestrator.clients.conversation.http import HttpConversationClient
from agent_orchestrator.clients.exchange import environment_proxy

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """Accepts connections; each is served by `handler(reader, writer, n)`, n counting
    connections from 1. Records every request head it reads."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.heads.append(head)
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":")[1]))
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def json_response(body: bytes, *extra: bytes) -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", *extra]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def ctx(**fields: str) -> CallContext:
    return CallContext(tenant_id="acme", correlation_id="corr-1", **fields)


async def test_keep_alive_reuses_one_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(json_response(b'{"messages": []}'))

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", "tok")
        try:
            for _ in range(3):
                assert await client.get_history(ctx(), session_id="s", limit=5) == []
        finally:
            await client.aclose()
    assert server.connections == 1
    assert len(server.heads) == 3  # three requests really went over that one connection
    first = server.heads[0].decode()
    assert first.startswith("GET /v1/sessions/s/messages?limit=5 HTTP/1.1\r\n")
    for line in ("Authorization: Bearer tok", "X-Tenant-ID: acme", "X-Correlation-ID: corr-1"):
        assert f"{line}\r\n" in first
    assert "traceparent: 00-" in first


async def test_a_reused_connection_closed_by_the_server_is_retried_for_a_get() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(json_response(b'{"messages": []}'))
        await writer.drain()
        if n == 1:
            await server.read_request(reader)  # the keep-alive timeout struck: no answer

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            await client.get_history(ctx(), session_id="s", limit=5)
            assert await client.get_history(ctx(), session_id="s", limit=5) == []
        finally:
            await client.aclose()
    assert server.connections == 2
    # The first, the one the closing connection swallowed, and its resend on a new one.
    assert len(server.heads) == 3


async def history_error(server: Server, call: CallContext) -> DownstreamError:
    """The error of a history call to `server`."""
    client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
    try:
        with pytest.raises(DownstreamError) as caught:
            await client.get_history(call, session_id="s", limit=5)
    finally:
        await client.aclose()
    return caught.value


async def test_a_fresh_connection_closed_before_an_answer_is_unreachable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)

    async with serving(handler) as server:
        error = await history_error(server, ctx())
    assert (error.code, error.retryable) == ("unreachable", True)
    # aiohttp resends an idempotent request once on a closed connection; anything more is
    # the coordinator's retry policy.
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"mes\r\n10\r\nsages": [], "x":\r\n2\r\n1}\r\n0\r\n\r\n',
            id="chunked",
        ),
        pytest.param(
            b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"messages": []}', id="to-close"
        ),
    ],
)
async def test_body_framings(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            assert await client.get_history(ctx(), session_id="s", limit=5) == []
        finally:
            await client.aclose()


@pytest.mark.parametrize("tenant", ["acme\r\nX-Evil: 1", "acme\x01"])
async def test_a_control_character_in_a_header_value_is_refused_unsent(tenant: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)

    async with serving(handler) as server:
        error = await history_error(server, CallContext(tenant_id=tenant))
    assert (error.code, error.retryable) == ("invalid_request", False)
    assert server.heads == []


async def test_a_base_url_path_prefixes_every_target() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(json_response(b'{"messages": []}'))
        await writer.drain()

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}/conv/", None)
        try:
            await client.get_history(ctx(), session_id="s", limit=5)
        finally:
            await client.aclose()
    assert server.heads[0].startswith(b"GET /conv/v1/sessions/s/messages?limit=5 HTTP/1.1")


def test_the_environment_names_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert environment_proxy("http://svc.internal/") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("http://svc.internal/") == "http://proxy.internal:3128"
    assert environment_proxy("https://svc.internal/") is None  # HTTPS_PROXY is its own
    monkeypatch.setenv("NO_PROXY", "svc.internal")
    assert environment_proxy("http://svc.internal/") is None


async def test_requests_go_through_the_environments_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(json_response(b'{"messages": []}'))
        await writer.drain()

    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with serving(handler) as server:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
        client = HttpConversationClient("http://conversation.internal", None)
        try:
            assert await client.get_history(ctx(), session_id="s", limit=5) == []
        finally:
            await client.aclose()
    assert server.heads[0].startswith(
        b"GET http://conversation.internal/v1/sessions/s/messages?limit=5 HTTP/1.1"
    )


async def test_a_cancelled_stream_closes_its_connection_at_once() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        await writer.drain()
        await reader.read()  # until the client closes its end
        closed.set()

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)

        async def read_forever() -> None:
            async with client.exchange.stream("GET", "x", {}, None) as response:
                async for _ in response.iter_bytes():
                    pass

        reader = asyncio.create_task(read_forever())
        try:
            await asyncio.sleep(0.2)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            await asyncio.wait_for(closed.wait(), timeout=1.0)
        finally:
            await client.aclose()


async def _pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_sse_lines_end_with_crlf_lf_or_cr_across_reads() -> None:
    stream = _pieces(
        b'data: {"a": 1}\r',
        b'\n\r\ndata: {"b": "\xe2\x80',
        b'\xa8"}\n\ndata: {"c": 3}\r\rdata: tail',
    )
    payloads = [payload async for payload in sse_data(stream)]
    assert payloads == ['{"a": 1}', '{"b": "\u2028"}', '{"c": 3}', "tail"]
