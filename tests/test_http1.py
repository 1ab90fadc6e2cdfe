"""The lean HTTP/1.1 transport (clients/http1.py) against a scripted raw socket server:
body framings, keep-alive and its races, header safety, and SSE line endings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from agent_orchestrator.clients.base import CallContext, DownstreamError, sse_data
from agent_orchestrator.clients.conversation.http import HttpConversationClient
from agent_orchestrator.clients.exchange import HttpxExchange, open_exchange
from agent_orchestrator.clients.http1 import HIGH_WATER

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
    first = server.heads[0].decode()
    assert first.startswith("GET /v1/sessions/s/messages?limit=5 HTTP/1.1\r\n")
    assert "Authorization: Bearer tok\r\n" in first
    assert "X-Tenant-ID: acme\r\n" in first


async def test_a_connection_closed_by_the_server_as_it_is_reused_is_retried_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        if n == 1:
            writer.write(json_response(b'{"messages": []}'))
            await writer.drain()
            await server.read_request(reader)  # the keep-alive timeout struck: no answer
            return
        writer.write(json_response(b'{"messages": []}'))
        await writer.drain()
        await server.read_request(reader)

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            await client.get_history(ctx(), session_id="s", limit=5)
            assert await client.get_history(ctx(), session_id="s", limit=5) == []
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_a_fresh_connection_closed_before_an_answer_is_unreachable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            with pytest.raises(DownstreamError) as caught:
                await client.get_history(ctx(), session_id="s", limit=5)
        finally:
            await client.aclose()
    assert (caught.value.code, caught.value.retryable) == ("unreachable", True)
    assert server.connections == 1  # not retried: the coordinator's policy decides


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


async def test_connection_close_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(json_response(b'{"messages": []}', b"Connection: close"))
        await writer.drain()

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            for _ in range(2):
                await client.get_history(ctx(), session_id="s", limit=5)
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_a_line_break_in_a_header_value_is_refused_unsent() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            with pytest.raises(DownstreamError) as caught:
                await client.get_history(
                    CallContext(tenant_id="acme\r\nX-Evil: 1"), session_id="s", limit=5
                )
        finally:
            await client.aclose()
    assert (caught.value.code, caught.value.retryable) == ("invalid_request", False)
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


def test_https_and_proxies_stay_on_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"fixed_headers": {}, "timeout": 1.0, "max_connections": 1}
    assert isinstance(open_exchange("https://svc.internal", **settings), HttpxExchange)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert isinstance(open_exchange("http://svc.internal", **settings), HttpxExchange)
    monkeypatch.setenv("NO_PROXY", "svc.internal")
    assert not isinstance(open_exchange("http://svc.internal", **settings), HttpxExchange)


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


async def test_bodies_larger_than_the_high_water_mark_arrive_whole() -> None:
    big = b'{"messages": [], "pad": "' + b"x" * (3 * HIGH_WATER) + b'"}'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(json_response(big))
            await writer.drain()

    async with serving(handler) as server:
        client = HttpConversationClient(f"http://127.0.0.1:{server.port}", None)
        try:
            assert await client.get_history(ctx(), session_id="s", limit=5) == []
            reply = await client.exchange.fetch("GET", "x", {}, None)
            assert len(reply.body) == len(big)
            async with client.exchange.stream("GET", "x", {}, None) as response:
                received = 0
                async for piece in response.iter_bytes():
                    received += len(piece)
                    await asyncio.sleep(0)  # a slow reader: the socket is paused meanwhile
            assert received == len(big)
        finally:
            await client.aclose()
