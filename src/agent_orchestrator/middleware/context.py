"""Correlation id and request size cap: the pieces the request layer (request.py) applies.

The correlation id comes from `X-Correlation-ID` when it is sane, else a new one; it is
kept in the ASGI scope's state, bound to every structlog line of the request and echoed on
every response (errors included).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import Scope, Send

from agent_orchestrator.errors import error_body

HEADER = "x-correlation-id"
HEADER_BYTES = HEADER.encode()
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def peer_address(scope: Scope) -> str | None:
    """The client's address as the server saw it, or None when the transport has none.
    Behind `TRUSTED_PROXIES`, uvicorn has already replaced it with the one
    `X-Forwarded-For` names (and only then: a forged header from anyone else changes
    nothing)."""
    client = scope.get("client")
    return str(client[0]) if client and client[0] else None


def correlation_id_of(scope: Scope) -> str | None:
    state: dict[str, Any] = scope.get("state") or {}
    value = state.get("correlation_id")
    return value if isinstance(value, str) else None


def sane_id(value: bytes) -> str | None:
    """The header's value when it is safe to echo and log as is, else None."""
    text = value.decode("latin-1")
    return text if _SANE_ID.match(text) else None


def new_id() -> str:
    # The documented "32-hex id" (docs/api.md), 128 random bits; uuid4().hex is the same
    # shape but costs four times as much for version bits nobody reads.
    return os.urandom(16).hex()


def incoming_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The first sane `X-Correlation-ID`, else a new id."""
    for name, value in headers:
        if name == HEADER_BYTES and (sane := sane_id(value)) is not None:
            return sane
    return new_id()


def with_correlation_id(
    headers: list[tuple[bytes, bytes]], echo: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    # Error handlers set the header themselves (the 500 one runs outside the request
    # layer); keep exactly one. A new list: the response object owns the one passed in.
    kept = [item for item in headers if item[0] != HEADER_BYTES]
    kept.append(echo)
    return kept


async def send_error(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An error in the one shape (`error_body`), sent by the request layer itself before
    the app runs."""
    encoded = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(encoded)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": encoded})


def _too_large(max_bytes: int) -> tuple[str, dict[str, int]]:
    return f"request body exceeds {max_bytes} bytes", {"max_bytes": max_bytes}


async def send_too_large(send: Send, max_bytes: int, correlation_id: str) -> None:
    """413, sent before the app runs (the Content-Length said it)."""
    message, details = _too_large(max_bytes)
    await send_error(send, 413, error_body("payload_too_large", message, details, correlation_id))


class BodyTooLarge(HTTPException):
    """413 for a chunked body found too large while the app reads it. An HTTPException,
    since FastAPI turns any other exception raised while it reads a body into a 400; it
    carries the same `details` as the 413 sent by Content-Length."""

    def __init__(self, max_bytes: int) -> None:
        message, self.details = _too_large(max_bytes)
        super().__init__(413, message)
