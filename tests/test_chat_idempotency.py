"""Idempotency-Key: a repeat returns the first task; a different request or another user
with the same key gets a conflict and learns nothing about the first task."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta

import httpx
from sqlalchemy import update

from agent_orchestrator.config import Settings
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.db.types import utcnow
from tests.conftest import TokenFactory, auth, running_app


async def test_a_key_answers_only_its_own_request(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = auth(make_token(user="alice"))
    bob = auth(make_token(user="bob"))
    first = await client.post(
        "/api/v1/chat", json={"message": "hello"}, headers={**alice, "Idempotency-Key": "k-1"}
    )
    assert first.status_code == 202, first.text
    task_id = first.json()["task_id"]

    again = await client.post(
        "/api/v1/chat", json={"message": "hello"}, headers={**alice, "Idempotency-Key": "k-1"}
    )
    assert again.status_code == 202
    assert again.json()["task_id"] == task_id

    changed = await client.post(
        "/api/v1/chat", json={"message": "other"}, headers={**alice, "Idempotency-Key": "k-1"}
    )
    assert changed.status_code == 409, changed.text
    assert changed.json()["error"]["code"] == "conflict"

    stolen = await client.post(
        "/api/v1/chat",
        json={"message": "hello", "mode": "stream"},
        headers={**bob, "Idempotency-Key": "k-1"},
    )
    assert stolen.status_code == 409, stolen.text
    assert task_id not in stolen.text
    bobs_sessions = await client.get("/api/v1/sessions", headers=bob)
    assert bobs_sessions.json()["items"] == []


async def test_an_empty_key_is_refused_naming_the_header(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """Sent empty, the header would be one key that every such request shares."""
    headers = {**auth(make_token()), "Idempotency-Key": ""}
    for url, body in (
        ("/api/v1/chat", {"message": "hello"}),
        ("/api/v1/batch", {"items": [{"message": "hello"}]}),
    ):
        response = await client.post(url, json=body, headers=headers)
        assert response.status_code == 422, response.text
        [detail] = response.json()["error"]["details"]
        assert (detail["field"], detail["in"]) == ("idempotency-key", "header"), detail
    assert (await client.get("/api/v1/tasks", headers=auth(make_token()))).json()["items"] == []


async def test_a_repeat_of_an_ended_turn_answers_at_once_once_its_events_are_gone(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """The turn's events expire with EVENTS_TTL; a repeat then has nothing to follow:
    `wait` reads the turn back at once (it waited its whole bound), `stream` is a 204 (it
    never ended)."""
    headers = {**auth(make_token()), "Idempotency-Key": "k-old"}
    async with running_app(make_backend_settings(events_ttl=1)) as client:
        body = {"message": "hello", "mode": "wait"}
        first = await client.post("/api/v1/chat", json=body, headers=headers)
        assert first.status_code == 200, first.text
        assert first.json()["task"]["status"] == "succeeded"
        await asyncio.sleep(1.5)  # its events are gone now
        state = client.app.state.core  # type: ignore[attr-defined]
        async with state.db_factory() as db:  # and it ended long ago, not just now
            task_id = uuid.UUID(first.json()["task"]["id"])
            long_ago = utcnow() - timedelta(minutes=5)
            await db.execute(
                update(TaskRow).where(TaskRow.id == task_id).values(finished_at=long_ago)
            )
            await db.commit()
        async with asyncio.timeout(10):
            again = await client.post("/api/v1/chat", json=body, headers=headers)
            streamed = await client.post(
                "/api/v1/chat", json={**body, "mode": "stream"}, headers=headers
            )
    assert again.status_code == 200, again.text
    assert again.json()["task"]["id"] == first.json()["task"]["id"]
    assert again.json()["message"] == first.json()["message"]
    assert streamed.status_code == 204, streamed.text
