"""The event bus's publish script on a connection of its own, pipelined.

Why not the shared redis-py client: a command through it cost ~60 us of CPU (pool
checkout and release, a liveness probe, a timeout task per send) against ~15 us for
the bytes themselves, and a chat turn publishes a dozen events. Here every publish is a
RESP command appended to one buffer that is written once per event-loop iteration, so
concurrent publishes (many turns in one worker) share one write, and replies are
matched to callers in order. Plain TCP only: for TLS, a unix socket or a credential
provider, `for_client` answers None and the bus keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Longest wait for a reply before the connection is given up (redis-py's default).
REPLY_TIMEOUT = 5.0


def _command(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        value = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


class _Replies(asyncio.Protocol):
    """Parses the replies the publisher needs (simple, error, integer, bulk strings) and
    hands each to the oldest waiting caller."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buffer = bytearray()
        self.lost: Exception | None = None
        self.out: list[bytes] = []  # commands of this loop iteration, written together

    def send(self, command: bytes, waiter: asyncio.Future[Any]) -> None:
        self.waiting.append(waiter)
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(command)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.lost is None and self.transport is not None:
            self.transport.write(b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.waiting:
            reply = self._take()
            if reply is _INCOMPLETE:
                return
            waiter = self.waiting.popleft()
            if not waiter.done():
                if isinstance(reply, Exception):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        if self.buffer:  # a reply nobody waits for: the stream is out of step
            self.fail(RedisConnectionError("unexpected data from Redis"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, error: Exception) -> None:
        self.lost = self.lost or error
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def _take(self) -> Any:
        buffer = self.buffer
        end = buffer.find(b"\r\n")
        if end < 0:
            return _INCOMPLETE
        kind, line = buffer[:1], bytes(buffer[1:end])
        if kind == b"$":
            size = int(line)
            if size < 0:
                del buffer[: end + 2]
                return None
            if len(buffer) < end + 2 + size + 2:
                return _INCOMPLETE
            value = bytes(buffer[end + 2 : end + 2 + size])
            del buffer[: end + 2 + size + 2]
            return value
        del buffer[: end + 2]
        if kind == b"+":
            return line
        if kind == b":":
            return int(line)
        if kind == b"-":
            return ResponseError(line.decode(errors="replace"))
        return RedisConnectionError(f"unexpected reply type {kind!r} from Redis")


_INCOMPLETE = object()


class ScriptPublisher:
    """EVALSHA of one script over one pipelined connection, (re)connected on demand."""

    def __init__(self, script: str, *, host: str, port: int, handshake: list[bytes]) -> None:
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script, usedforsecurity=False).hexdigest().encode()
        self._host = host
        self._port = port
        self._handshake = handshake  # AUTH, SELECT, CLIENT SETNAME as the URL asks
        self._replies: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None

    @classmethod
    def for_client(cls, redis: Redis, script: str) -> ScriptPublisher | None:
        pool = redis.connection_pool
        if type(pool) is not ConnectionPool or pool.connection_class is not Connection:
            return None
        kwargs = pool.connection_kwargs
        if kwargs.get("credential_provider"):
            return None
        handshake = []
        if kwargs.get("password"):
            if kwargs.get("username"):
                handshake.append(_command("AUTH", kwargs["username"], kwargs["password"]))
            else:
                handshake.append(_command("AUTH", kwargs["password"]))
        if kwargs.get("db"):
            handshake.append(_command("SELECT", int(kwargs["db"])))
        if kwargs.get("client_name"):
            handshake.append(_command("CLIENT", "SETNAME", kwargs["client_name"]))
        host, port = kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
        return cls(script, host=host, port=port, handshake=handshake)

    async def run(self, keys: list[str], args: list[bytes | str | int]) -> Any:
        command = [b"EVALSHA", self._sha, len(keys), *keys, *args]
        try:
            return await self._call(_command(*command))
        except ResponseError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
        command[:2] = [b"EVAL", self._script]  # Redis lost its script cache: send it whole
        return await self._call(_command(*command))

    async def aclose(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None and replies.transport is not None:
            replies.transport.close()

    async def _call(self, command: bytes) -> Any:
        try:
            return await self._once(command)
        except RedisConnectionError:
            # Like redis-py's own retry: the connection broke (Redis restarted, or closed
            # it as idle), so the command goes once more on a new one.
            return await self._once(command)

    async def _once(self, command: bytes) -> Any:
        replies = await self._connection()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        replies.send(command, waiter)
        timer = loop.call_later(REPLY_TIMEOUT, _expire, replies)
        try:
            return await waiter
        finally:
            timer.cancel()

    async def _connection(self) -> _Replies:
        replies = self._replies
        if replies is not None and replies.lost is None:
            return replies
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                _, replies = await loop.create_connection(_Replies, self._host, self._port)
                for command in self._handshake:
                    waiter: asyncio.Future[Any] = loop.create_future()
                    replies.send(command, waiter)
                    await waiter  # a refused AUTH or SELECT raises its ResponseError
        except TimeoutError as error:
            raise RedisTimeoutError("connecting to Redis timed out") from error
        except OSError as error:
            raise RedisConnectionError(f"cannot connect to Redis: {error}") from error
        self._replies = replies
        return replies


def _expire(replies: _Replies) -> None:
    # The oldest reply is overdue: the connection's state is unknown, so it is dropped
    # (every caller on it fails now; the next publish connects anew).
    replies.fail(RedisTimeoutError("no reply from Redis in time"))
