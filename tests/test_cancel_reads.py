"""Cancelling a chat turn reads its task once: the chat-kind check is the ledger's
(`request_cancel(..., kind=...)`), not a second lookup in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
from fastapi import FastAPI

from agent_orchestrator.app import create_app
from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.models.principal import USER_SCOPES, Principal
from agent_orchestrator.services.orchestrator import CHAT_KIND
from agent_orchestrator.services.task_ledger import Submission
from agent_orchestrator.state import AppState
from tests.conftest import TokenFactory, auth
from tests.sql_trace import statements_sent

CHAT = "/api/v1/chat"
ALICE = Principal("tenant-a", "user-1", frozenset(USER_SCOPES))


@asynccontextmanager
async def api_only(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with no worker: a queued task stays queued until cancelled."""
    app: FastAPI = create_app(settings, run_worker=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@contextmanager
def task_selects(state: AppState) -> Iterator[list[str]]:
    """SELECTs on `tasks` sent meanwhile."""
    with statements_sent(state) as sent:
        seen: list[str] = []
        yield seen
    seen.extend(text for text in sent if text.startswith("select") and "from tasks" in text)


async def queue_task(state: AppState, kind: str) -> str:
    async with UnitOfWork(state.db_factory) as uow:
        row, _ = await state.ledger.submit(
            uow, ALICE, Submission(kind=kind, queue="interactive", input={})
        )
    return str(row.id)


async def test_cancelling_a_chat_turn_reads_its_task_once(
    make_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    async with api_only(make_settings()) as client:
        state: AppState = client.app.state.core  # type: ignore[attr-defined]
        task_id = await queue_task(state, CHAT_KIND)
        with task_selects(state) as selects:
            response = await client.post(f"{CHAT}/{task_id}/cancel", headers=auth(token()))
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "cancelled"
        assert len(selects) == 1, selects


async def test_the_chat_api_does_not_cancel_other_kinds(
    make_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    async with api_only(make_settings()) as client:
        state: AppState = client.app.state.core  # type: ignore[attr-defined]
        task_id = await queue_task(state, "test.sleep")
        response = await client.post(f"{CHAT}/{task_id}/cancel", headers=auth(token()))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert response.json()["error"]["message"] == "chat turn not found"
        view = await client.get(f"/api/v1/tasks/{task_id}", headers=auth(token()))
        assert view.json()["status"] == "queued"
