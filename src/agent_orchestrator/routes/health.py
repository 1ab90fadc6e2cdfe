"""Liveness, readiness (every dependency reported) and Prometheus metrics. No auth."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from agent_orchestrator.clients.probes import UnhealthyAnswer, probe, probe_targets
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.resilience.circuit_breaker import CircuitState
from agent_orchestrator.routes.deps import State
from agent_orchestrator.routes.openapi import errors
from agent_orchestrator.state import AppState

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _check(check: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except UnhealthyAnswer as answer:
        return {"status": "down", "http_status": answer.http_status}
    except Exception as exc:  # any failure means down; the type says why
        return {"status": "down", "error": type(exc).__name__}
    return {"status": "ok"}


class ServiceHealth(BaseModel):
    status: str
    circuit: str | None = None
    error: str | None = None
    http_status: int | None = None


class Readiness(BaseModel):
    status: str
    dependencies: dict[str, dict[str, str]]
    services: dict[str, ServiceHealth] | None = None


@router.get(
    "/health/ready",
    response_model=None,
    responses={
        200: {
            "model": Readiness,
            "description": "the database and Redis answer; `status` is `degraded` when a "
            "downstream service does not (deep check only)",
        },
        503: {"model": Readiness, "description": "the database or Redis is down"},
        **errors(422),  # `deep` that is not a boolean
    },
)
async def ready(state: State, deep: bool = False) -> JSONResponse:
    """Readiness: the database and Redis, which this instance cannot serve without. With
    `deep=true`, also every downstream service called over HTTP and the circuit breakers
    of this process: a service that is down makes the answer `degraded`, never 503, since
    every instance would then leave the load balancer for what none of them can fix."""

    async def database() -> None:
        async with state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    checks: dict[str, dict[str, Any]] = {"database": await _check(database)}
    if state.redis is not None:
        checks["redis"] = await _check(state.redis.ping)
    healthy = all(check["status"] == "ok" for check in checks.values())
    body: dict[str, Any] = {"status": "ok" if healthy else "down", "dependencies": checks}
    if deep:
        services = await _services(state)
        body["services"] = services
        if healthy and any(entry["status"] != "ok" for entry in services.values()):
            body["status"] = "degraded"
    return JSONResponse(body, status_code=200 if healthy else 503)


async def _services(state: AppState) -> dict[str, dict[str, Any]]:
    targets = probe_targets(state.coordinator.services)
    names = list(targets)
    results = await asyncio.gather(
        *(_check(functools.partial(probe, *targets[name])) for name in names)
    )
    services = dict(zip(names, results, strict=True))
    if state.worker is not None:
        # Breakers live where plans run: only a process with a worker has them to report.
        for name, entry in services.items():
            breaker = state.coordinator.breakers.get(name)
            entry["circuit"] = breaker.state.value if breaker else CircuitState.CLOSED.value
            if entry["status"] == "ok" and entry["circuit"] != CircuitState.CLOSED.value:
                entry["status"] = "degraded"
    return services


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    settings = state.settings
    queues = (settings.queue_interactive, settings.queue_bulk)
    await state.backlog.refresh(state.db_single, utcnow(), queues)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
