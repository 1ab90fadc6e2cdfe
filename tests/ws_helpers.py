"""What the WebSocket tests share: a real uvicorn server (the app of `create_app`, the
options of `serve`) on a free loopback port in a background thread, and small client
helpers over the `websockets` library.

The server has its own event loop, so a client in the test's loop talks to it over real
sockets exactly as another process would; `ServerThread.call` runs a coroutine in the
server's loop (to publish on its in-process bus or read its counts).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent_orchestrator.app import create_app
from agent_orchestrator.config import Settings
from agent_orchestrator.websocket.gateway import WebSocketGateway
from agent_orchestrator.websocket.server import server_options
from tests.processes import free_port

T = TypeVar("T")
Message = dict[str, Any]


class ServerThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            **server_options(settings),
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="ws-test-server", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/v1"

    @property
    def gateway(self) -> WebSocketGateway:
        gateway: WebSocketGateway = self.app.state.websockets
        return gateway

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as error:
            self._error = error
        finally:
            self.loop.close()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test server did not start: {self._error!r}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(20)

    async def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def counts(self) -> dict[str, int]:
        """Read in the server's loop, where they change."""

        async def read() -> dict[str, int]:
            manager = self.gateway.manager
            return {
                "connections": manager.connection_count(),
                "subscriptions": manager.subscription_count(),
                "bus_subscribers": self.app.state.core.bus.subscriber_count(),
                "tasks": len(asyncio.all_tasks()),
            }

        return await self.call(read())


async def wait_for(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float
) -> T:
    """Await `probe` until `accept` takes its value, and return that value; fail the test
    with the last value after `timeout` seconds (never return one that was not accepted)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        assert time.monotonic() <= deadline, f"not accepted after {timeout} s: {value!r}"
        await asyncio.sleep(0.05)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> Message:
    async with asyncio.timeout(timeout):
        message: Message = json.loads(await ws.recv())
        return message


async def recv_until(
    ws: ClientConnection, accept: Callable[[Message], bool], timeout: float = 10.0
) -> list[Message]:
    """Every message up to and including the first `accept`ed one."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            seen.append(message)
            if accept(message):
                return seen


async def send(ws: ClientConnection, **message: Any) -> None:
    await ws.send(json.dumps(message))


def answer_to(request_id: str) -> Callable[[Message], bool]:
    """For `recv_until`: the server's answer to the message sent with `request_id` (a
    subscription's events may come in between)."""
    return lambda m: m["type"].startswith("system.") and m["data"].get("request_id") == request_id


async def open_authed(url: str, token: str, **options: Any) -> tuple[ClientConnection, Message]:
    """A socket that sent `auth` and got its hello."""
    ws = await connect(url, open_timeout=10, **options)
    await send(ws, type="auth", token=token)
    hello = await recv(ws)
    assert (hello["type"], hello["data"].get("for")) == ("system.ack", "auth"), hello
    return ws, hello


async def close_code(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes; the code it sent (None: no close frame)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


def is_terminal(message: Message) -> bool:
    return message["type"] == "task.status" and message["data"]["status"] in {
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
    }


def connections_settled(counts: dict[str, int]) -> bool:
    """No connection and no subscription left on the instance."""
    return counts["connections"] == 0 and counts["subscriptions"] == 0
