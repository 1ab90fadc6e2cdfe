"""Correlation id and request size cap, as pure ASGI middleware (no per-request task hop).

The correlation id comes from `X-Correlation-ID` when it is sane, else a new one; it is
kept in the ASGI scope's state, bound to every structlog line of the request and echoed on
every response (errors included).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_orchestrator.errors import error_body

HEADER = "x-correlation-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def correlation_id_of(scope: Scope) -> str | None:
    state: dict[str, Any] = scope.get("state") or {}
    value = state.get("correlation_id")
    return value if isinstance(value, str) else None


def _incoming_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == HEADER.encode():
            text: str = value.decode("latin-1")
            if _SANE_ID.match(text):
                return text
    return uuid.uuid4().hex


class ContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        correlation_id = _incoming_id(scope)
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        header = (HEADER.encode(), correlation_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Error handlers set the header themselves (the 500 one runs outside this
                # middleware); keep exactly one.
                headers = [item for item in message.get("headers", []) if item[0] != header[0]]
                message["headers"] = [*headers, header]
            await send(message)

        with structlog.contextvars.bound_contextvars(correlation_id=correlation_id):
            await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(scope, send)
                return

        received = 0

        async def counting_receive() -> Message:
            # Chunked bodies carry no Content-Length: count while the app reads. Raised as
            # an HTTPException so the framework's body parsing passes it through as a 413.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        body = json.dumps(
            error_body(
                "payload_too_large",
                f"request body exceeds {self.max_bytes} bytes",
                {"max_bytes": self.max_bytes},
                correlation_id_of(scope),
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
