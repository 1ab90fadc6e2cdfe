"""Idempotency-Key: a repeat returns the first task; a different request or another user
with the same key gets a conflict and learns nothing about the first task."""

from __future__ import annotations

import httpx

from tests.conftest import TokenFactory, auth


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
