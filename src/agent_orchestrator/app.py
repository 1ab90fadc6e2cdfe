"""create_app(settings): middleware order, routers, and the lifespan that builds AppState."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent_orchestrator.config import Settings
from agent_orchestrator.lifecycle import build_state, close_state
from agent_orchestrator.middleware.auth import Introspector
from agent_orchestrator.middleware.errors import install_error_handlers
from agent_orchestrator.middleware.request import RequestMiddleware
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.routes import batch, chat, health, internal, sessions, tasks, ws
from agent_orchestrator.routes.openapi import refine_openapi
from agent_orchestrator.services.rate_limit_redis import RedisRateStore
from agent_orchestrator.services.rate_limiter import MemoryRateStore, RateLimiter
from agent_orchestrator.state import build_verifier
from agent_orchestrator.websocket.gateway import WebSocketGateway

log = get_logger(__name__)


def create_app(
    settings: Settings, *, run_worker: bool = True, schema_checked: bool = False
) -> FastAPI:
    verifier = build_verifier(settings)
    limiter = RateLimiter(settings)  # its store comes with the lifespan's Redis client
    introspector = Introspector(settings.identity_cache_seconds)  # and its client too

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await build_state(
            settings, verifier, run_worker=run_worker, schema_checked=schema_checked
        )
        log.info(
            "service ready",
            database=state.engine.url.get_backend_name(),
            redis=state.redis is not None,
            worker=state.worker is not None,
            environment=settings.environment.value,
        )
        if state.redis is not None:
            shared = RedisRateStore(state.redis, settings.redis_namespace)
            state.closeable.append(shared)
            limiter.store = shared
        else:
            limiter.store = MemoryRateStore()
        state.limiter = limiter
        introspector.client = state.coordinator.services.get("identity")
        introspector.limiter = limiter
        state.introspector = introspector
        app.state.core = state
        gateway = WebSocketGateway(state)
        app.state.websockets = gateway
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            await close_state(state)

    app = FastAPI(
        title="Agent Orchestrator Service",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry looks up the global providers on every request
        # (5-8 us) to find out whether anyone installed one. This service makes its own
        # spans, only when an exporter is configured (observability/tracing.py).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(sessions.router)
    app.include_router(tasks.router)
    app.include_router(batch.router)
    app.include_router(internal.router)
    app.include_router(ws.router)
    refine_openapi(app, settings)
    # Correlation id -> metrics -> body-size limit -> auth -> rate limits, in one layer
    # (request.py says why).
    app.add_middleware(
        RequestMiddleware,
        verifier=verifier,
        max_body_bytes=settings.max_request_bytes,
        limiter=limiter,
        introspector=introspector,
    )
    return app
