from __future__ import annotations

import httpx

from tests.conftest import TokenFactory, auth


async def test_create_then_read(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    headers = auth(make_token())
    created = await client.post("/api/v1/sessions", json={"metadata": {"k": 1}}, headers=headers)
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    read = await client.get(f"/api/v1/sessions/{session_id}", headers=headers)
    assert read.status_code == 200
    assert read.json()["metadata"] == {"k": 1}
    assert read.json()["state"] == "active"
