"""`/metrics` reports the queues' backlog and the live sessions from the database, on both
backends: with no worker, chat turns stay queued, and the gauges follow the ledger."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.config import Settings
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.observability.backlog import BacklogGauges
from agent_orchestrator.state import AppState
from tests.conftest import TokenFactory, auth
from tests.test_cancel_reads import api_only


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    """The backlog samples of one scrape, by name and labels as Prometheus prints them."""
    text = (await http.get("/metrics")).text
    wanted = ("queue_depth", "queue_lag_seconds", "tasks_running", "sessions_active")
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if any(name.startswith(f"nooble_orchestrator_{part}") for part in wanted):
            samples[name.removeprefix("nooble_orchestrator_")] = float(value)
    return samples


async def test_metrics_follow_the_queued_tasks_and_live_sessions(
    settings: Settings, make_token: TokenFactory
) -> None:
    async with api_only(settings) as http:
        state: AppState = http.app.state.core  # type: ignore[attr-defined]
        state.backlog = BacklogGauges(min_interval=0)  # every scrape reads the database
        headers = auth(make_token())

        empty = await scrape(http)
        assert empty['queue_depth{queue="interactive"}'] == 0
        assert empty['queue_depth{queue="bulk"}'] == 0
        assert empty['queue_lag_seconds{queue="interactive"}'] == 0
        assert empty["sessions_active"] == 0

        turns = []
        for text in ("first", "second"):
            response = await http.post("/api/v1/chat", json={"message": text}, headers=headers)
            assert response.status_code == 202, response.text
            turns.append(response.json())
        await asyncio.sleep(0.3)
        waiting = await scrape(http)
        assert waiting['queue_depth{queue="interactive"}'] == 2
        assert waiting['tasks_running{queue="interactive"}'] == 0
        assert 0.3 <= waiting['queue_lag_seconds{queue="interactive"}'] < 30
        assert waiting["sessions_active"] == 2  # each turn opened its own session

        # A retry waiting for its backoff is queued but not yet due: no lag of its own.
        later, earlier = utcnow() + timedelta(hours=1), utcnow() - timedelta(hours=1)
        first, second = (uuid.UUID(turn["task_id"]) for turn in turns)
        async with state.db_factory() as db:
            await db.execute(update(TaskRow).where(TaskRow.id == first).values(not_before=later))
            await db.execute(update(TaskRow).where(TaskRow.id == second).values(not_before=earlier))
            await db.commit()
        # The other has been due for an hour, though queued a moment ago.
        due = await scrape(http)
        assert due['queue_depth{queue="interactive"}'] == 2
        assert 3590 < due['queue_lag_seconds{queue="interactive"}'] < 3700

        closed = await http.delete(f"/api/v1/sessions/{turns[0]['session_id']}", headers=headers)
        assert closed.status_code == 200, closed.text
        cancelled = await http.post(f"/api/v1/chat/{second}/cancel", headers=headers)
        assert cancelled.status_code == 202, cancelled.text
        after = await scrape(http)
        assert after["sessions_active"] == 1
        assert after['queue_depth{queue="interactive"}'] == 1  # the cancelled one is gone
        assert after['queue_lag_seconds{queue="interactive"}'] == 0  # the other is not due


async def test_metrics_report_the_database_pool_in_use(
    settings: Settings, make_token: TokenFactory, backend: str
) -> None:
    async def pool(http: httpx.AsyncClient) -> dict[str, float]:
        text = (await http.get("/metrics")).text
        found = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("nooble_orchestrator_db_connections"):
                found[name.removeprefix("nooble_orchestrator_db_")] = float(value)
        return found

    async with api_only(settings) as http:
        state: AppState = http.app.state.core  # type: ignore[attr-defined]
        assert (await http.get("/api/v1/sessions", headers=auth(make_token()))).status_code == 200
        if backend == "sqlite":  # one held connection, not a pool: nothing to report
            assert (await pool(http))["connections_limit"] == 0
            return
        before = await pool(http)
        assert before["connections_limit"] == 2 * settings.db_pool_size
        assert before['connections{state="idle"}'] >= 1  # the request's, given back
        async with state.engine.connect():
            held = await pool(http)
        assert held['connections{state="in_use"}'] == before['connections{state="in_use"}'] + 1
    # The app stopped: its pool is no longer reported.
    assert REGISTRY.get_sample_value("nooble_orchestrator_db_connections_limit") == 0


async def test_scrapes_read_the_database_at_most_once_per_interval(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    opened = 0

    def counting() -> AsyncSession:
        nonlocal opened
        opened += 1
        return factory()

    gauges = BacklogGauges(min_interval=60)
    for _ in range(3):
        await gauges.refresh(counting, utcnow(), ("interactive", "bulk"))  # type: ignore[arg-type]
    assert opened == 1
    fresh = BacklogGauges(min_interval=0)
    for _ in range(2):
        await fresh.refresh(counting, utcnow(), ("interactive", "bulk"))  # type: ignore[arg-type]
    assert opened == 3
