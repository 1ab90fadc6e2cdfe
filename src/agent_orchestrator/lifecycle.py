"""Building and tearing down a process's state: shared by `serve` (via the app lifespan)
and `worker`, so both run the same adapters for the same settings."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from agent_orchestrator.clients.directory import build_directory
from agent_orchestrator.clients.webhooks import (
    Reach,
    WebhookSender,
    parse_networks,
)
from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import (
    create_engine,
    dispose_sessions,
    session_factory,
    single_statement_factory,
)
from agent_orchestrator.db.migrate import is_up_to_date, upgrade
from agent_orchestrator.middleware.auth import TokenVerifier
from agent_orchestrator.observability.pools import forget_pool, watch_pool
from agent_orchestrator.observability.tracing import start_tracing, stop_tracing
from agent_orchestrator.queue.engine import WorkerEngine, build_bus, build_ledger, build_queue
from agent_orchestrator.queue.registry import HandlerRegistry
from agent_orchestrator.queue.tasks import register_builtin_kinds
from agent_orchestrator.services.batches import BatchManager
from agent_orchestrator.services.once_keys import MemoryOnceKeys, RedisOnceKeys
from agent_orchestrator.services.orchestrator import ChatOrchestrator
from agent_orchestrator.services.service_coordinator import ResilienceSettings, ServiceCoordinator
from agent_orchestrator.services.service_events import ServiceEvents
from agent_orchestrator.services.session_cache import (
    MemorySessionCache,
    RedisSessionCache,
    SessionCache,
)
from agent_orchestrator.services.session_manager import SessionManager
from agent_orchestrator.services.token_budget import MemoryUsage, RedisUsage, TokenBudget
from agent_orchestrator.state import AppState


class StartupError(RuntimeError):
    """A dependency is missing or not ready: said in one line, and the process exits."""


class SchemaNotMigrated(StartupError):
    pass


async def preflight(settings: Settings) -> None:
    """Check what start-up needs before serving, so that a missing database, an
    unmigrated schema or an unreachable Redis ends the process with one clear line."""
    engine = create_engine(settings.resolved_database_url(), pool_size=1)
    try:
        await _ensure_schema(settings, engine)
    except StartupError:
        raise
    except Exception as error:
        raise StartupError(f"database unreachable ({type(error).__name__}: {error})") from error
    finally:
        await engine.dispose()
    if settings.redis_uri:
        redis = Redis.from_url(settings.redis_uri, socket_connect_timeout=3)
        try:
            await redis.ping()
        except Exception as error:
            raise StartupError(f"Redis unreachable at REDIS_URI ({error})") from error
        finally:
            await redis.aclose()


async def _ensure_schema(settings: Settings, engine: AsyncEngine) -> None:
    """Migrate (AUTO_MIGRATE), or refuse a schema that is not at head."""
    if settings.should_auto_migrate:
        await upgrade(engine)
    elif not await is_up_to_date(engine):
        raise SchemaNotMigrated("database schema is not at head: run `agent-orchestrator migrate`")


async def build_state(
    settings: Settings, verifier: TokenVerifier, *, run_worker: bool, schema_checked: bool = False
) -> AppState:
    """`schema_checked`: the caller ran `preflight` (the CLI does), so the schema step is
    not run a second time; anything else (tests, an embedding app) gets it here."""
    engine = create_engine(
        settings.resolved_database_url(),
        pool_size=settings.db_pool_size,
        pre_ping=settings.db_pool_pre_ping,
    )
    if not schema_checked:
        try:
            await _ensure_schema(settings, engine)
        except SchemaNotMigrated:
            await engine.dispose()
            raise
    redis = Redis.from_url(settings.redis_uri) if settings.redis_uri else None
    cache: SessionCache = (
        RedisSessionCache(redis, settings.redis_namespace)
        if redis
        else MemorySessionCache(settings.session_cache_size)
    )
    factory = session_factory(engine)
    single = single_statement_factory(engine, factory)
    bus = build_bus(settings, redis)
    queue = build_queue(settings, redis)
    await bus.start()
    await queue.start()
    registry = HandlerRegistry()
    services, closeable = build_directory(settings, single)
    sessions = SessionManager(ttl_seconds=settings.session_ttl, cache=cache)
    ledger = build_ledger(settings, single, bus, queue)
    reach = Reach(parse_networks(settings.webhook_allowed_networks))
    budget = TokenBudget(
        RedisUsage(redis, settings.redis_namespace) if redis else MemoryUsage(),
        settings.tenant_token_budget,
        settings.tenant_token_budgets,
    )
    webhooks = WebhookSender(
        settings.webhook_key(),
        reach,
        timeout=settings.webhook_timeout,
    )
    state = AppState(
        settings=settings,
        engine=engine,
        db_factory=factory,
        db_single=single,
        redis=redis,
        verifier=verifier,
        sessions=sessions,
        bus=bus,
        queue=queue,
        ledger=ledger,
        registry=registry,
        coordinator=ServiceCoordinator(services, resilience_of(settings)),
        orchestrator=ChatOrchestrator(settings, sessions, ledger, budget),
        batches=BatchManager(settings, sessions, ledger, bus, factory, reach, budget),
        budget=budget,
        webhooks=webhooks,
        service_events=ServiceEvents(
            sessions,
            bus,
            RedisOnceKeys(redis, settings.redis_namespace) if redis else MemoryOnceKeys(),
            ttl_seconds=settings.events_ttl,
        ),
        closeable=[*closeable, webhooks],
    )
    register_builtin_kinds(registry, state)
    start_tracing(settings.otel_exporter_otlp_endpoint, settings.otel_service_name)
    if engine.dialect.name == "postgresql":  # pool size plus as many overflow (db/engine.py)
        watch_pool(engine.pool, 2 * settings.db_pool_size)
    if run_worker:
        state.worker = WorkerEngine(
            settings=settings,
            ledger=state.ledger,
            queue=queue,
            bus=bus,
            registry=registry,
            db_factory=factory,
            sweeps=[state.batches.sweep],
        )
        await state.worker.start()
    return state


def resilience_of(settings: Settings) -> ResilienceSettings:
    return ResilienceSettings(
        failure_threshold=settings.circuit_failure_threshold,
        failure_rate=settings.circuit_failure_rate,
        window_seconds=settings.circuit_window_seconds,
        open_seconds=settings.circuit_open_seconds,
        half_open_probes=settings.circuit_half_open_probes,
        service_concurrency=settings.service_concurrency,
        retry_concurrency=settings.service_retry_concurrency,
    )


async def close_state(state: AppState) -> None:
    if state.worker is not None:
        await state.worker.stop()
    for client in state.closeable:
        await client.aclose()
    await state.queue.close()
    await state.bus.close()
    if state.redis is not None:
        await state.redis.aclose()
    dispose_sessions(state.db_factory)
    forget_pool(state.engine.pool)
    await state.engine.dispose()
    if state.settings.otel_exporter_otlp_endpoint:
        # The exporter's last batch is an HTTP POST: off the event loop.
        await asyncio.to_thread(stop_tracing)
