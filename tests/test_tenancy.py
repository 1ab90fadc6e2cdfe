"""Tenant isolation and ownership: another tenant's or another user's session does not
exist for the caller (404, never 403) on every session route; `admin` sees the tenant."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import TokenFactory, auth

SESSIONS = "/api/v1/sessions"


def _every_route(session_id: str) -> list[tuple[str, str, Any]]:
    url = f"{SESSIONS}/{session_id}"
    return [
        ("GET", url, None),
        ("PATCH", url, {"metadata": {"taken": True}}),
        ("DELETE", url, None),
        ("GET", f"{url}/messages", None),
    ]


async def _create(client: httpx.AsyncClient, token: str, **body: Any) -> Any:
    response = await client.post(SESSIONS, json=body, headers=auth(token))
    assert response.status_code == 201, response.text
    return response.json()


async def _list_ids(client: httpx.AsyncClient, token: str, **params: Any) -> set[str]:
    response = await client.get(SESSIONS, params={"limit": 100, **params}, headers=auth(token))
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"]}


async def _assert_invisible(
    client: httpx.AsyncClient, token: str, session_id: str, owner_token: str, original: Any
) -> None:
    for method, url, body in _every_route(session_id):
        response = await client.request(method, url, json=body, headers=auth(token))
        assert response.status_code == 404, (method, url, response.text)
        error = response.json()["error"]
        assert error["code"] == "not_found"
    # Nothing the outsider tried changed the session.
    read = await client.get(f"{SESSIONS}/{session_id}", headers=auth(owner_token))
    assert read.json() == original


async def test_other_tenant_gets_404_on_every_route(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    owner = make_token(tenant="tenant-a", user="alice")
    intruder = make_token(tenant="tenant-b", user="alice")  # same user id, other tenant
    session = await _create(client, owner, metadata={"secret": "a"})
    await _assert_invisible(client, intruder, session["id"], owner, session)

    # Even an admin of tenant B cannot see tenant A's session.
    admin_b = make_token(tenant="tenant-b", user="root", scopes=["admin"])
    await _assert_invisible(client, admin_b, session["id"], owner, session)


async def test_not_found_is_indistinguishable_from_missing(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    owner = make_token(tenant="tenant-a", user="alice")
    intruder = make_token(tenant="tenant-b", user="bob")
    session = await _create(client, owner)
    other = await client.get(f"{SESSIONS}/{session['id']}", headers=auth(intruder))
    missing = await client.get(f"{SESSIONS}/{uuid.uuid4()}", headers=auth(intruder))
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["message"] == missing.json()["error"]["message"]


async def test_lists_never_cross_tenants(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice_a = make_token(tenant="tenant-a", user="alice")
    alice_b = make_token(tenant="tenant-b", user="alice")
    admin_b = make_token(tenant="tenant-b", user="root", scopes=["admin"])
    ours = {(await _create(client, alice_a))["id"] for _ in range(3)}
    theirs = {(await _create(client, alice_b))["id"] for _ in range(2)}
    closed = next(iter(theirs))
    deleted = await client.delete(f"{SESSIONS}/{closed}", headers=auth(alice_b))
    assert deleted.status_code == 200, deleted.text

    assert await _list_ids(client, alice_a) == ours
    assert await _list_ids(client, alice_b) == theirs
    assert await _list_ids(client, admin_b) == theirs
    assert await _list_ids(client, alice_a, state="closed") == set()
    assert await _list_ids(client, alice_b, state="closed") == {closed}
    assert await _list_ids(client, admin_b, state="closed") == {closed}
    assert await _list_ids(client, alice_a, state="active") == ours


async def test_other_user_of_same_tenant_gets_404(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = make_token(tenant="tenant-a", user="alice")
    bob = make_token(tenant="tenant-a", user="bob")
    session = await _create(client, alice, metadata={"mine": True})
    bobs = await _create(client, bob)

    await _assert_invisible(client, bob, session["id"], alice, session)
    assert await _list_ids(client, bob) == {bobs["id"]}
    assert await _list_ids(client, alice) == {session["id"]}


async def test_admin_sees_and_manages_the_whole_tenant(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = make_token(tenant="tenant-a", user="alice")
    bob = make_token(tenant="tenant-a", user="bob")
    admin = make_token(tenant="tenant-a", user="ops", scopes=["admin"])
    alices = await _create(client, alice)
    bobs = await _create(client, bob)

    assert await _list_ids(client, admin) == {alices["id"], bobs["id"]}
    read = await client.get(f"{SESSIONS}/{alices['id']}", headers=auth(admin))
    assert read.status_code == 200
    assert read.json()["user_id"] == "alice"
    messages = await client.get(f"{SESSIONS}/{alices['id']}/messages", headers=auth(admin))
    assert messages.status_code == 200

    patched = await client.patch(
        f"{SESSIONS}/{alices['id']}", json={"metadata": {"by": "ops"}}, headers=auth(admin)
    )
    assert patched.status_code == 200
    assert patched.json()["user_id"] == "alice", "an admin's edit keeps the owner"
    closed = await client.delete(f"{SESSIONS}/{bobs['id']}", headers=auth(admin))
    assert closed.status_code == 200
    assert closed.json()["state"] == "closed"
    assert (await client.get(f"{SESSIONS}/{bobs['id']}", headers=auth(bob))).json()[
        "state"
    ] == "closed"
