"""The one pure-ASGI layer in front of the routes. Per HTTP request, in this order:

1. correlation id (context.py): the sane `X-Correlation-ID` or a new one, kept in the
   scope's state, bound to the log context and echoed on every response;
2. trace: a valid W3C `traceparent` kept for the request (trace_context.py) and, with
   tracing on, the request's server span (tracing.py);
3. HTTP metrics (metrics.py): count and latency by method, route template and status;
4. body-size limit: 413 by `Content-Length` before anything else runs, or while the app
   reads a body that has none;
5. authentication (auth.py): the bearer token's principal, or the error, left in the state
   for the routes (`/internal/*` checks its own service token; tokens of another issuer
   may be asked of the Identity Service);
6. rate limits (rate_limit.py) on `/api/*`: a 429 before the app runs, or the
   `RateLimit-*` headers on the response.

One layer rather than one per concern: every layer is another coroutine frame that each
resumption of the request passes through, another scan of the headers and another wrapper
around `send` or `receive`. WebSockets get the correlation id only; the gateway
authenticates them itself.
"""

from __future__ import annotations

import time

from opentelemetry.trace import Span, SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, reset_contextvars

from agent_orchestrator.middleware.auth import Introspector, TokenVerifier, authenticate
from agent_orchestrator.middleware.context import (
    HEADER_BYTES,
    BodyTooLarge,
    incoming_id,
    new_id,
    peer_address,
    sane_id,
    send_too_large,
    with_correlation_id,
)
from agent_orchestrator.middleware.rate_limit import (
    LIMITED_PREFIX,
    rate_limit_headers,
    send_rate_limited,
)
from agent_orchestrator.observability import tracing
from agent_orchestrator.observability.metrics import record_http_request, route_template
from agent_orchestrator.observability.trace_context import INCOMING, parse_traceparent
from agent_orchestrator.services.rate_limiter import RateLimiter


def end_server_span(span: Span, method: str, route: str, status: int, correlation_id: str) -> None:
    span.update_name(f"{method} {route}")
    span.set_attributes(
        {
            "http.request.method": method,
            "http.route": route,
            "http.response.status_code": status,
            "correlation_id": correlation_id,
        }
    )
    if status >= 500:
        span.set_status(StatusCode.ERROR)
    span.end()


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: TokenVerifier,
        max_body_bytes: int,
        limiter: RateLimiter | None = None,
        introspector: Introspector | None = None,
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.introspector = introspector
        self.max_body_bytes = max_body_bytes
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        correlation_id = incoming_id(scope.get("headers", []))
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        # bind/reset rather than the bound_contextvars context manager: a quarter the cost.
        tokens = bind_contextvars(correlation_id=correlation_id)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_contextvars(**tokens)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        limit = self.max_body_bytes
        correlation_id: str | None = None
        authorization: bytes | None = None
        traceparent: bytes | None = None
        too_large = False
        for name, value in scope.get("headers", []):  # one pass for every step
            if name == HEADER_BYTES:
                if correlation_id is None:
                    correlation_id = sane_id(value)
            elif name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"traceparent":
                if traceparent is None:
                    traceparent = value
            elif name == b"content-length" and value.isdigit() and int(value) > limit:
                too_large = True
        if correlation_id is None:
            correlation_id = new_id()
        state = scope.setdefault("state", {})
        state["correlation_id"] = correlation_id
        echo = (HEADER_BYTES, correlation_id.encode())
        status = 500  # what the server error handler sends if the app raises before a response
        received = 0
        limit_headers: list[tuple[bytes, bytes]] = []

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = with_correlation_id(message.get("headers", []), echo)
                headers += limit_headers
                message["headers"] = headers
            await send(message)

        async def counting_receive() -> Message:
            # Chunked bodies carry no Content-Length: count while the app reads (a 413 the
            # framework's body parsing passes through: BodyTooLarge).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        tokens = bind_contextvars(correlation_id=correlation_id)
        incoming = parse_traceparent(traceparent.decode("latin-1")) if traceparent else None
        span = None
        if tracing.TRACER is not None:
            # The request's span: the client's child, and the parent of the task it queues.
            span = tracing.start_span(scope["method"], incoming, kind=SpanKind.SERVER)
            if span is not None:
                incoming = tracing.traceparent_of(span)
        trace = INCOMING.set(incoming) if incoming is not None else None
        try:
            if too_large:
                await send_too_large(send_with_id, limit, correlation_id)
                return
            path = scope["path"]
            address = peer_address(scope)
            if not path.startswith("/internal/"):
                await authenticate(self.verifier, self.introspector, authorization, state, address)
            if self.limiter is not None and path.startswith(LIMITED_PREFIX):
                decision = await self.limiter.check(state.get("principal"), address)
                if decision is not None:
                    if not decision.allowed:
                        await send_rate_limited(send_with_id, decision, correlation_id)
                        return
                    limit_headers += rate_limit_headers(decision)
            await self.app(scope, counting_receive, send_with_id)
        finally:
            reset_contextvars(**tokens)
            if trace is not None:
                INCOMING.reset(trace)
            route = route_template(scope)
            record_http_request(scope["method"], route, status, time.perf_counter() - started)
            if span is not None:
                end_server_span(span, scope["method"], route, status, correlation_id)
