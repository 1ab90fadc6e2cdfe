"""create_app(settings): middleware order, routers, and the lifespan that builds AppState."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fastapi import FastAPI
from redis.asyncio import Redis

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import create_engine, session_factory
from agent_orchestrator.db.migrate import is_up_to_date, upgrade
from agent_orchestrator.middleware.auth import AuthMiddleware, TokenVerifier
from agent_orchestrator.middleware.context import BodySizeLimitMiddleware, ContextMiddleware
from agent_orchestrator.middleware.errors import install_error_handlers
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import HttpMetricsMiddleware
from agent_orchestrator.routes import health, internal, sessions
from agent_orchestrator.services.session_cache import (
    MemorySessionCache,
    RedisSessionCache,
    SessionCache,
)
from agent_orchestrator.services.session_manager import SessionManager
from agent_orchestrator.state import AppState, build_verifier

log = get_logger(__name__)


class SchemaNotMigrated(RuntimeError):
    pass


async def build_state(settings: Settings, verifier: TokenVerifier) -> AppState:
    engine = create_engine(settings.resolved_database_url(), pool_size=settings.db_pool_size)
    if settings.should_auto_migrate:
        await upgrade(engine)
    elif not await is_up_to_date(engine):
        await engine.dispose()
        raise SchemaNotMigrated("database schema is not at head: run `agent-orchestrator migrate`")
    redis = Redis.from_url(settings.redis_uri) if settings.redis_uri else None
    cache: SessionCache = (
        RedisSessionCache(redis, settings.redis_namespace) if redis else MemorySessionCache(settings.session_cache_size)
    )
    return AppState(
        settings=settings,
        engine=engine,
        db_factory=session_factory(engine),
        redis=redis,
        verifier=verifier,
        sessions=SessionManager(ttl_seconds=settings.session_ttl, cache=cache),
    )


async def close_state(state: AppState) -> None:
    if state.redis is not None:
        await state.redis.aclose()
    await state.engine.dispose()


def create_app(settings: Settings) -> FastAPI:
    verifier = build_verifier(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await build_state(settings, verifier)
        log.info(
            "service ready",
            database=state.engine.url.get_backend_name(),
            redis=state.redis is not None,
            environment=settings.environment.value,
        )
        app.state.core = state
        try:
            yield
        finally:
            await close_state(state)

    app = FastAPI(
        title="Agent Orchestrator Service",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(internal.router)
    # Added innermost first: requests pass Context -> Metrics -> BodySize -> Auth -> routes.
    app.add_middleware(AuthMiddleware, verifier=verifier)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(ContextMiddleware)
    return app
