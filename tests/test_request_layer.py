"""The request layer (middleware/request.py): what each step leaves behind, seen from a
stub app underneath it, and the HTTP metrics the real app records."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import REGISTRY
from starlette.types import Message, Receive, Scope, Send

from agent_orchestrator.app import create_app
from agent_orchestrator.config import Settings
from agent_orchestrator.middleware import request as request_layer
from agent_orchestrator.middleware.auth import TokenVerifier
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.observability import metrics
from tests.conftest import TokenFactory, auth

SECRET = "request-layer-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def backend() -> str:
    return "sqlite"


class StubApp:
    """Records what it was called with and what the log context held, then answers 204."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.log_context: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        self.log_context.append(structlog.contextvars.get_contextvars())
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})


def _token() -> str:
    verifier = TokenVerifier(SECRET)
    return verifier.issue(tenant_id="t", user_id="u", scopes=["a"], ttl_seconds=60, now=time.time())


async def _call(
    layer: request_layer.RequestMiddleware,
    scope_type: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
) -> list[Message]:
    scope: Scope = {"type": scope_type, "method": "GET", "path": path, "headers": headers}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await layer(scope, receive, send)
    return sent


def _layer(stub: StubApp, max_body_bytes: int = 100) -> request_layer.RequestMiddleware:
    return request_layer.RequestMiddleware(
        stub, verifier=TokenVerifier(SECRET), max_body_bytes=max_body_bytes
    )


async def test_http_gets_correlation_id_principal_and_log_context() -> None:
    stub = StubApp()
    headers = [
        (b"x-correlation-id", b"not sane!"),
        (b"x-correlation-id", b"second.one"),
        (b"authorization", f"Bearer {_token()}".encode()),
        (b"authorization", b"Basic ignored-the-first-one-counts"),
    ]
    sent = await _call(_layer(stub), "http", "/api/v1/sessions", headers)

    state = stub.scopes[0]["state"]
    assert state["correlation_id"] == "second.one"  # the first sane one
    assert isinstance(state["principal"], Principal)
    assert "auth_error" not in state
    assert stub.log_context == [{"correlation_id": "second.one"}]
    assert structlog.contextvars.get_contextvars() == {}  # unbound once the request ends
    assert sent[0]["headers"] == [(b"x-correlation-id", b"second.one")]


async def test_internal_paths_and_websockets_are_not_authenticated_here() -> None:
    stub = StubApp()
    bearer = [(b"authorization", f"Bearer {_token()}".encode())]
    await _call(_layer(stub), "http", "/internal/v1/ping", bearer)
    await _call(_layer(stub), "websocket", "/ws", bearer)
    for scope in stub.scopes:
        assert set(scope["state"]) == {"correlation_id"}
    websocket_id = stub.scopes[1]["state"]["correlation_id"]
    assert stub.log_context[1] == {"correlation_id": websocket_id}
    assert structlog.contextvars.get_contextvars() == {}


async def test_a_declared_oversized_body_is_refused_before_the_app_runs() -> None:
    stub = StubApp()
    headers = [(b"content-length", b"101"), (b"x-correlation-id", b"big-1")]
    sent = await _call(_layer(stub, max_body_bytes=100), "http", "/api/v1/chat", headers)
    assert stub.scopes == []
    assert sent[0]["status"] == 413
    assert (b"x-correlation-id", b"big-1") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "payload_too_large"
    assert error["correlation_id"] == "big-1"


async def test_lifespan_passes_through_untouched() -> None:
    stub = StubApp()
    await _call(_layer(stub), "lifespan", "", [])
    assert "state" not in stub.scopes[0]


def _requests(method: str, route: str, status: int) -> float:
    labels = {"method": method, "route": route, "status": str(status)}
    return REGISTRY.get_sample_value("nooble_orchestrator_http_requests_total", labels) or 0.0


def _timed(method: str, route: str) -> float:
    labels = {"method": method, "route": route}
    name = "nooble_orchestrator_http_request_duration_seconds_count"
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def small_client(make_settings: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(max_request_bytes=1024))

    @app.get("/boom/{number}")
    async def boom(number: int) -> None:
        raise RuntimeError("boom")

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(0, size, 256):
        yield b"x" * 256


@pytest.mark.parametrize("cached", [True, False])
async def test_http_metrics_by_method_route_template_and_status(
    small_client: httpx.AsyncClient,
    make_token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
    cached: bool,
) -> None:
    if not cached:  # past the bound of remembered label children
        monkeypatch.setattr(metrics, "_MAX_HTTP_CHILDREN", 0)
    user = auth(make_token())
    sessions, one = "/api/v1/sessions", "/api/v1/sessions/{session_id}"
    expected = {
        ("GET", "/health", 200): 2,
        ("GET", "unmatched", 404): 1,
        ("GET", one, 404): 1,
        ("GET", "/boom/{number}", 500): 1,
        ("POST", "unmatched", 413): 1,  # refused by Content-Length, before routing
        ("POST", sessions, 413): 1,  # counted while the route read it
        ("other", "/health", 405): 1,  # a method outside the known set mints no label
    }
    before = {key: _requests(*key) for key in expected}
    timed_before = _timed("GET", "/health")

    await small_client.get("/health")
    await small_client.get("/health")
    await small_client.get("/no/such/route")
    await small_client.get(f"{sessions}/00000000-0000-0000-0000-000000000000", headers=user)
    await small_client.get("/boom/7")
    big = {**user, "content-type": "application/json"}
    await small_client.post(sessions, content=b"x" * 2048, headers=big)
    await small_client.post(sessions, content=_chunks(4096), headers=big)
    await small_client.request("PROPFIND", "/health")

    assert {key: _requests(*key) - before[key] for key in expected} == expected
    assert _requests("PROPFIND", "/health", 405) == 0
    assert _timed("GET", "/health") - timed_before == 2
