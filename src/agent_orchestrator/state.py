"""What the lifespan builds and every request or job reads: typed, built once per process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from agent_orchestrator.clients.webhooks import WebhookSender
from agent_orchestrator.config import Settings
from agent_orchestrator.events.bus import EventBus
from agent_orchestrator.middleware.auth import Introspector, TokenVerifier
from agent_orchestrator.middleware.jwks import JwksKeys
from agent_orchestrator.observability.backlog import BacklogGauges
from agent_orchestrator.queue.base import TaskQueue
from agent_orchestrator.queue.engine import WorkerEngine
from agent_orchestrator.queue.registry import HandlerRegistry
from agent_orchestrator.services.batches import BatchManager
from agent_orchestrator.services.orchestrator import ChatOrchestrator
from agent_orchestrator.services.rate_limiter import RateLimiter
from agent_orchestrator.services.service_coordinator import ServiceCoordinator
from agent_orchestrator.services.service_events import ServiceEvents
from agent_orchestrator.services.session_manager import SessionManager
from agent_orchestrator.services.task_ledger import TaskLedger
from agent_orchestrator.services.token_budget import TokenBudget
from agent_orchestrator.services.turn_results import TurnResults


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    db_factory: async_sessionmaker[AsyncSession]
    #: one statement per session (see db.engine.single_statement_factory)
    db_single: async_sessionmaker[AsyncSession]
    redis: Redis | None
    verifier: TokenVerifier
    sessions: SessionManager
    bus: EventBus
    queue: TaskQueue
    ledger: TaskLedger
    registry: HandlerRegistry
    coordinator: ServiceCoordinator
    orchestrator: ChatOrchestrator
    batches: BatchManager
    #: posts batches' callbacks (used by the worker side)
    webhooks: WebhookSender
    #: events other services publish to sessions (/internal/v1)
    service_events: ServiceEvents
    #: the tenants' daily LLM token budgets
    budget: TokenBudget
    closeable: list[Any] = field(default_factory=list)
    worker: WorkerEngine | None = None
    #: the request rate limits, shared by the HTTP layer and the WebSocket gateway
    limiter: RateLimiter | None = None
    #: tokens of other issuers, asked of the Identity Service (None: not configured)
    introspector: Introspector | None = None
    #: queue and session gauges, read from the database when /metrics is scraped
    backlog: BacklogGauges = field(default_factory=BacklogGauges)
    #: finished turns handed over by a worker to this process's waiting requests
    turn_results: TurnResults = field(default_factory=TurnResults)

    def __post_init__(self) -> None:
        self.bus.on_handover(self.turn_results.offer)


def build_verifier(settings: Settings) -> TokenVerifier:
    return TokenVerifier(
        settings.verification_key(),
        algorithm=settings.jwt_algorithm,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
        keys=JwksKeys(settings.jwt_jwks_url, settings.jwt_algorithm)
        if settings.jwt_jwks_url
        else None,
    )
