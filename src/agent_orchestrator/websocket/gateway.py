"""`/ws/v1` as a plain ASGI application: Origin, caps, accept, authentication, the receive
loop, and teardown on every way out. docs/realtime.md is the protocol's reference.

The handshake is refused (HTTP 403) for a wrong Origin. Everything else is said with
close codes after accepting, because a browser cannot read the status of a refused
handshake: 1008 for authentication and policy, 1009 for an oversized message, 1013 for
a cap.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from agent_orchestrator.errors import RateLimited, ServiceUnavailable, Unauthorized, error_body
from agent_orchestrator.middleware.auth import resolve
from agent_orchestrator.middleware.context import correlation_id_of
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.state import AppState
from agent_orchestrator.websocket.admission import (
    BEARER,
    OriginPolicy,
    client_address,
    header,
    offered_token,
)
from agent_orchestrator.websocket.connection import Connection, ConnectionLimits
from agent_orchestrator.websocket.connection_manager import Caps, ConnectionManager, Timeouts
from agent_orchestrator.websocket.events import (
    AuthMessage,
    EventEncoder,
    ProtocolError,
    ack_message,
    error_message,
    parse_client_message,
)
from agent_orchestrator.websocket.fanout import StreamFanout
from agent_orchestrator.websocket.handlers import MessageHandlers, end_unpermitted_subscriptions
from agent_orchestrator.websocket.limits import Verdict
from agent_orchestrator.websocket.metrics import RECEIVED, REFUSED
from agent_orchestrator.websocket.revalidation import Revalidation

log = get_logger(__name__)

PROTOCOL_VERSION = "v1"


class WebSocketGateway:
    def __init__(self, state: AppState) -> None:
        settings = state.settings
        self.state = state
        self.origins = OriginPolicy(
            settings.allowed_origins, allow_missing=settings.ws_allow_missing_origin
        )
        self.manager = ConnectionManager(
            Caps(
                instance=settings.websocket_max_connections,
                per_tenant=settings.ws_max_connections_per_tenant,
                per_ip=settings.ws_max_connections_per_ip,
            ),
            Timeouts(auth=settings.ws_auth_timeout, idle=settings.ws_idle_timeout),
        )
        self.limits = ConnectionLimits(
            send_queue=settings.ws_send_queue,
            messages_per_second=settings.ws_messages_per_second,
            max_subscriptions=settings.ws_max_subscriptions,
        )
        self.max_message_bytes = settings.ws_max_frame_bytes
        self.handlers = MessageHandlers(state)
        self.fanout = StreamFanout(state.bus, EventEncoder())
        introspector = state.introspector
        self.revalidation = (
            Revalidation(introspector)
            if introspector is not None and introspector.client is not None
            else None
        )

    async def start(self) -> None:
        await self.manager.start()
        if self.revalidation is not None:
            await self.revalidation.start()

    async def stop(self) -> None:
        if self.revalidation is not None:
            await self.revalidation.stop()
        await self.manager.stop()

    # --- one socket -----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.origins.permits(header(scope, b"origin")):
            REFUSED.labels("origin").inc()
            await _deny(scope, send, 403, "forbidden", "this Origin may not open a WebSocket")
            return
        conn = Connection(
            connection_id=secrets.token_hex(6),
            ip=client_address(scope),
            send=send,
            fanout=self.fanout,
            limits=self.limits,
        )
        refusal = self.manager.admit(conn)
        if refusal is not None:
            REFUSED.labels(refusal.label).inc()
            await _accept_and_close(send, 1013, refusal.reason)
            return
        try:
            await self._serve(conn, scope, receive, send)
        except asyncio.CancelledError:
            if not conn.forced:
                raise
            # Our own watchdog: the close could not be written in time.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except OSError:
            pass  # the peer went away while we accepted
        finally:
            if self.revalidation is not None:
                self.revalidation.forget(conn)
            try:
                await conn.teardown()
            finally:
                self.manager.release(conn)

    async def _serve(self, conn: Connection, scope: Scope, receive: Receive, send: Send) -> None:
        bearer, token = offered_token(scope)
        await send({"type": "websocket.accept", "subprotocol": BEARER if bearer else None})
        if bearer:
            if token is None:
                self._refuse(conn, "offer the token as the subprotocol after 'bearer'", None)
            else:
                await self._authenticate(conn, token, None)
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind == "websocket.receive" and not conn.closing:
                await self._on_message(conn, message)

    async def _on_message(self, conn: Connection, message: Mapping[str, Any]) -> None:
        now = time.monotonic()
        conn.last_activity = now
        text = message.get("text")
        size = len(text) if text is not None else len(message.get("bytes") or b"")
        if size > self.max_message_bytes or (
            text is not None
            and size * 4 > self.max_message_bytes
            and len(text.encode()) > self.max_message_bytes
        ):
            conn.close(1009, "message too big")
            return
        verdict = conn.limiter.admit(now)
        if verdict is not Verdict.ALLOW:
            flood = verdict is Verdict.CLOSE
            conn.send(
                error_message(
                    "rate_limited",
                    f"more than {self.limits.messages_per_second:g} messages per second",
                    tenant_id=conn.tenant_id,
                    retryable=not flood,
                )
            )
            if flood:
                conn.close(1008, "message flood")
            return
        try:
            if text is None:
                raise ProtocolError(
                    "bad_request", "binary messages are not supported: send JSON text"
                )
            parsed = parse_client_message(text)
        except ProtocolError as error:
            RECEIVED.labels("invalid").inc()
            conn.send(
                error_message(
                    error.code,
                    error.message,
                    tenant_id=conn.tenant_id,
                    request_id=error.request_id,
                    details=error.details,
                )
            )
            if conn.principal is None:
                conn.close(1008, "authentication required: the first message must be 'auth'")
            return
        RECEIVED.labels(parsed.type).inc()
        if isinstance(parsed, AuthMessage):
            await self._authenticate(conn, parsed.token, parsed.request_id)
        elif conn.principal is None:
            self._refuse(conn, "authenticate first: the first message must be 'auth'", None)
        else:
            await self.handlers.handle(conn, parsed)

    async def _authenticate(self, conn: Connection, token: str, request_id: str | None) -> None:
        try:
            principal = await resolve(self.state.verifier, self.state.introspector, token, conn.ip)
        except Unauthorized as error:
            self._refuse(conn, error.message, request_id)
            return
        except (ServiceUnavailable, RateLimited) as error:
            # Not a bad token: say why, and close as "try again later".
            conn.send(
                error_message(
                    error.code,
                    error.message,
                    tenant_id=conn.tenant_id,
                    request_id=request_id,
                    details=error.details,
                )
            )
            conn.close(1013, "the token could not be checked now")
            return
        previous = conn.principal
        if previous is not None and not previous.same_caller(principal):
            self._refuse(conn, "a new token must be for the same tenant and user", request_id)
            return
        refusal = self.manager.authenticate(conn, principal)
        if refusal is not None:
            REFUSED.labels(refusal.label).inc()
            conn.close(1013, refusal.reason)
            return
        end_unpermitted_subscriptions(conn, principal)
        if self.revalidation is not None:
            introspector = self.state.introspector
            if introspector is not None and introspector.answered(token):
                self.revalidation.watch(conn, token)  # asked about again, periodically
            else:
                self.revalidation.forget(conn)  # a token of ours: its exp decides
        conn.send(
            ack_message(
                "auth",
                request_id,
                tenant_id=principal.tenant_id,
                protocol=PROTOCOL_VERSION,
                connection_id=conn.id,
                user_id=principal.user_id,
                scopes=sorted(principal.scopes),
                expires_at=principal.expires_at,
                limits={
                    "max_message_bytes": self.max_message_bytes,
                    "messages_per_second": self.limits.messages_per_second,
                    "send_queue": self.limits.send_queue,
                    "max_subscriptions": self.limits.max_subscriptions,
                    "idle_timeout": self.manager.timeouts.idle,
                },
                refreshed=previous is not None,
            )
        )

    def _refuse(self, conn: Connection, reason: str, request_id: str | None) -> None:
        conn.send(
            error_message("unauthorized", reason, tenant_id=conn.tenant_id, request_id=request_id)
        )
        conn.close(1008, reason)


async def _accept_and_close(send: Send, code: int, reason: str) -> None:
    try:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": code, "reason": reason})
    except OSError:
        pass


async def _deny(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    """Refuse the handshake with an HTTP response in the service's error shape, where the
    server supports it (ASGI `websocket.http.response`); else a bare close (403)."""
    try:
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(error_body(code, message, None, correlation_id_of(scope))).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    except OSError:
        pass
