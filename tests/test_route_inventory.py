"""Every route of the app declares an auth dependency, except an explicit allow-list; and
every such route really answers 401 to a caller without a token."""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fastapi.routing
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import WebSocketRoute

from agent_orchestrator.app import create_app
from agent_orchestrator.config import Settings
from agent_orchestrator.middleware.auth import require_scope
from tests.conftest import auth, running_app

PUBLIC = frozenset(
    {
        "/health",
        "/health/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
#: WebSocket endpoints that authenticate inside the protocol: a dependency cannot, since the
#: token arrives as the first message (or a subprotocol) after the handshake. Only plain
#: ASGI WebSocket routes at exactly these paths pass; tests/test_ws_gateway.py shows that
#: /ws/v1 closes every socket that does not authenticate (1008).
IN_PROTOCOL_AUTH = frozenset({"/ws/v1"})
_PARAM = re.compile(r"\{[^}]+\}")


def _dependency_calls(dependant: Dependant) -> Iterator[Any]:
    for child in dependant.dependencies:
        yield child.call
        yield from _dependency_calls(child)


def effective_routes(app: FastAPI) -> list[Any]:
    """Every route as served: FastAPI >= 0.16x keeps included routers as lazy entries and
    `iter_route_contexts` applies their prefixes and include-level dependencies."""
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(iterate(app.routes)) if iterate else list(app.routes)


def _original(route: Any) -> Any:
    return getattr(route, "original_route", route)


def _has_auth(route: Any) -> bool:
    dependant = getattr(route, "dependant", None)
    if not isinstance(dependant, Dependant):
        return False
    return any(
        getattr(call, "requires_auth", False) is True for call in _dependency_calls(dependant)
    )


def unprotected_routes(app: FastAPI) -> list[str]:
    """Paths (with methods) of routes outside the allow-list that lack an auth dependency."""
    missing = []
    for route in effective_routes(app):
        path = getattr(route, "path", None) or repr(route)
        if path in PUBLIC:
            continue
        if path in IN_PROTOCOL_AUTH and type(_original(route)) is WebSocketRoute:
            continue
        is_api = isinstance(_original(route), APIRoute | APIWebSocketRoute)
        if not is_api or not _has_auth(route):
            methods = sorted(getattr(route, "methods", None) or {"WEBSOCKET"})
            missing.append(f"{','.join(methods)} {path}")
    return missing


def _http_routes(app: FastAPI) -> list[tuple[str, str]]:
    return [
        (method, route.path)
        for route in effective_routes(app)
        if isinstance(_original(route), APIRoute) and route.path not in PUBLIC
        for method in sorted(route.methods - {"HEAD"})
    ]


def _concrete(path: str) -> str:
    return _PARAM.sub(lambda _match: str(uuid.uuid4()), path)


def test_every_route_outside_the_allow_list_requires_auth(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings())
    paths = {path for _method, path in _http_routes(app)}
    assert "/api/v1/sessions/{session_id}" in paths
    assert "/internal/v1/ping" in paths
    gateways = [route for route in effective_routes(app) if route.path in IN_PROTOCOL_AUTH]
    assert [type(_original(route)) for route in gateways] == [WebSocketRoute]
    assert unprotected_routes(app) == []


def test_the_inventory_catches_an_unprotected_route(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings())

    @app.get("/api/v1/leak/{item_id}")
    async def leak(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    @app.websocket("/ws/leak")
    async def leak_ws(websocket: WebSocket) -> None:
        await websocket.accept()

    router = APIRouter(prefix="/api/v1/nested")

    @router.post("/{item_id}")
    async def nested(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    app.include_router(router)
    assert unprotected_routes(app) == [
        "GET /api/v1/leak/{item_id}",
        "WEBSOCKET /ws/leak",
        "POST /api/v1/nested/{item_id}",
    ]


def test_an_include_level_auth_dependency_counts(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    router = APIRouter(prefix="/api/v1/guarded")

    @router.get("/{item_id}")
    async def guarded(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    app.include_router(router, dependencies=[Depends(require_scope("admin"))])
    assert unprotected_routes(app) == []


@pytest.mark.parametrize("token", [None, "junk"])
async def test_every_protected_route_answers_401_without_a_valid_token(
    make_settings: Callable[..., Settings], token: str | None
) -> None:
    settings = make_settings()
    async with running_app(settings) as client:
        app: FastAPI = client.app  # type: ignore[attr-defined]
        routes = _http_routes(app)
        assert len(routes) >= 6
        headers = auth(token) if token else {}
        for method, path in routes:
            response = await client.request(method, _concrete(path), json={}, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "unauthorized"


async def test_allow_listed_routes_answer_without_a_token(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as client:
        app: FastAPI = client.app  # type: ignore[attr-defined]
        present = {getattr(route, "path", None) for route in effective_routes(app)} & PUBLIC
        assert present >= {"/health", "/health/ready", "/metrics", "/docs", "/openapi.json"}
        for path in sorted(present - {"/docs/oauth2-redirect"}):
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)


def _runs_on_the_loop(call: Any) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def test_no_route_runs_a_dependency_or_endpoint_in_the_thread_pool(
    make_settings: Callable[..., Settings],
) -> None:
    """FastAPI runs a plain `def` dependency or endpoint in its thread pool: a hand-off per
    request for work that never blocks. Every one of ours is a coroutine."""
    app = create_app(make_settings())
    offenders = []
    for route in effective_routes(app):
        dependant = getattr(route, "dependant", None)
        if not isinstance(dependant, Dependant) or route.path in PUBLIC - {"/health"}:
            continue  # FastAPI's own docs routes
        calls = [dependant.call, *_dependency_calls(dependant)]
        offenders += [
            f"{route.path}: {getattr(call, '__qualname__', call)}"
            for call in calls
            if call is not None and not _runs_on_the_loop(call)
        ]
    assert offenders == []
