"""Liveness, readiness (every dependency reported) and Prometheus metrics. No auth."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from agent_orchestrator.db.types import utcnow
from agent_orchestrator.routes.deps import State

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _check(probe: Any) -> dict[str, Any]:
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # any failure means down; the type says why
        return {"status": "down", "error": type(exc).__name__}
    return {"status": "ok"}


class Readiness(BaseModel):
    status: str
    dependencies: dict[str, dict[str, str]]


@router.get(
    "/health/ready",
    response_model=None,
    responses={
        200: {"model": Readiness, "description": "every dependency answers"},
        503: {"model": Readiness, "description": "a dependency is down; `dependencies` says which"},
    },
)
async def ready(state: State) -> JSONResponse:
    async def database() -> None:
        async with state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    checks: dict[str, dict[str, Any]] = {"database": await _check(database)}
    if state.redis is not None:
        checks["redis"] = await _check(state.redis.ping)
    healthy = all(check["status"] == "ok" for check in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "down", "dependencies": checks},
        status_code=200 if healthy else 503,
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    settings = state.settings
    queues = (settings.queue_interactive, settings.queue_bulk)
    await state.backlog.refresh(state.db_single, utcnow(), queues)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
