"""A WebSocket client process for bench/websocket.py: holds many authenticated sockets to
one server and records, for every event it receives, publish-to-receive latency from the
`sent` timestamp in the event's data. Driven by JSON lines on stdin, answers on stdout:

    {"cmd": "open", "count": 250}                  -> {"open": 250, "seconds": 0.8}
    {"cmd": "subscribe", "sessions": [...], "count": 250, "offset": 0}
                                -> {"subscribed": 250}  (socket i: sessions[(offset + i) % n])
    {"cmd": "unsubscribe"}                         -> {"unsubscribed": 250}
    {"cmd": "collect"}                             -> {"latencies_ms": [...], "errors": 0}
    {"cmd": "rawsub", "redis": URL, "channel": C, "count": N}
                                                   -> {"ready": true} then {"latencies_ms": [...]}
    {"cmd": "exit"}

Each socket is a bare asyncio protocol around the `websockets` sans-I/O client (no task
per socket, and events are timed by reading their `sent` field without decoding the
rest), so on a machine shared with the server the client costs as little as it can: a
1,000-way fan-out is timed, not the client's own JSON decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

BATCH = 100  # sockets opened at once: well under the server's listen backlog
_SENT = re.compile(rb'"sent":([0-9.eE+-]+)')


class Socket(asyncio.Protocol):
    def __init__(self, fleet: Fleet, url: str) -> None:
        self.fleet = fleet
        self.ws = ClientProtocol(parse_uri(url), max_size=2**20)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.ws.send_request(self.ws.connect())
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            data = self.ws.data_to_send()
            if data:
                self.transport.write(b"".join(data))

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send_text(json.dumps(message).encode())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101 and not self.opened.done():
                    self.opened.set_exception(RuntimeError(f"handshake {event.status_code}"))
                elif not self.opened.done():
                    self.opened.set_result(None)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.fleet.on_message(bytes(event.data), now)
        self._flush()  # pongs, close replies

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(f"connection lost: {exc}"))
        self.fleet.errors += 0 if self.fleet.closing else 1


class Fleet:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.sockets: list[Socket] = []
        self.latencies: list[float] = []
        self.errors = 0
        self.closing = False
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.subscribed: list[str] = []

    def on_message(self, raw: bytes, now: float) -> None:
        if not raw.startswith(b'{"id":""'):  # an event: time it, decode nothing else
            found = _SENT.search(raw)
            if found is not None:
                self.latencies.append((now - float(found.group(1))) * 1000)
            return
        message = json.loads(raw)
        if message["type"] == "system.ack":
            future = self.waiting.pop(message["data"].get("request_id") or "", None)
            if future is not None and not future.done():
                future.set_result(None)
        elif message["type"] == "system.error":
            self.errors += 1

    async def _open_one(self) -> None:
        host, port = self.url.split("//", 1)[1].split("/", 1)[0].split(":")
        loop = asyncio.get_running_loop()
        _transport, sock = await loop.create_connection(
            lambda: Socket(self, self.url), host, int(port)
        )
        await asyncio.wait_for(sock.opened, 60)
        self.sockets.append(sock)
        await self._request(sock, {"type": "auth", "token": self.token}, f"a{len(self.sockets)}")

    async def open(self, count: int) -> dict[str, Any]:
        started = time.monotonic()
        for start in range(0, count, BATCH):
            await asyncio.gather(*(self._open_one() for _ in range(min(BATCH, count - start))))
        return {"open": len(self.sockets), "seconds": round(time.monotonic() - started, 3)}

    async def _request(self, sock: Socket, message: dict[str, Any], rid: str) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting[rid] = future
        sock.send({**message, "request_id": rid})
        await asyncio.wait_for(future, 60)

    async def _each(self, messages: list[tuple[Socket, dict[str, Any]]], prefix: str) -> int:
        jobs = [self._request(s, m, f"{prefix}{i}") for i, (s, m) in enumerate(messages)]
        for start in range(0, len(jobs), BATCH):
            await asyncio.gather(*jobs[start : start + BATCH])
        return len(jobs)

    async def subscribe(self, sessions: list[str], count: int, offset: int) -> dict[str, Any]:
        total = min(count, len(self.sockets))
        self.subscribed = [sessions[(offset + i) % len(sessions)] for i in range(total)]
        pairs = zip(self.sockets, self.subscribed, strict=False)
        messages = [(s, {"type": "subscribe", "session_id": sid}) for s, sid in pairs]
        return {"subscribed": await self._each(messages, "s")}

    async def unsubscribe(self) -> dict[str, Any]:
        pairs = zip(self.sockets, self.subscribed, strict=False)
        messages = [(s, {"type": "unsubscribe", "session_id": sid}) for s, sid in pairs]
        self.subscribed = []
        return {"unsubscribed": await self._each(messages, "u")}

    def collect(self) -> dict[str, Any]:
        samples, self.latencies = self.latencies, []
        errors, self.errors = self.errors, 0
        return {"latencies_ms": samples, "errors": errors}

    def close(self) -> None:
        self.closing = True
        for sock in self.sockets:
            if sock.transport is not None:
                sock.transport.close()


async def raw_subscribe(redis_url: str, channel: str, count: int) -> None:
    """Baseline: plain Redis Pub/Sub, publish -> this process, no gateway in between."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    reply({"ready": True})
    samples = []
    async for message in pubsub.listen():
        samples.append((time.time() - float(message["data"])) * 1000)
        if len(samples) >= count:
            break
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await redis.aclose()
    reply({"latencies_ms": samples})


def reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def serve(url: str, token: str) -> None:
    fleet = Fleet(url, token)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        match command["cmd"]:
            case "open":
                reply(await fleet.open(int(command["count"])))
            case "subscribe":
                count = int(command.get("count", len(fleet.sockets)))
                offset = int(command.get("offset", 0))
                reply(await fleet.subscribe(list(command["sessions"]), count, offset))
            case "unsubscribe":
                reply(await fleet.unsubscribe())
            case "collect":
                reply(fleet.collect())
            case "rawsub":
                await raw_subscribe(command["redis"], command["channel"], int(command["count"]))
            case "exit":
                break
    fleet.close()
    reply({"closed": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(serve(args.url, args.token))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.url, args.token))


if __name__ == "__main__":
    main()
