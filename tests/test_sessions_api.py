"""The sessions API on both backends: fields, paging, filters, expiry, PATCH rules, close,
409 on closed sessions, bad input refused with nothing written, and the audit trail."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.audit import AuditRepository
from agent_orchestrator.db.tables import AuditEntryRow, SessionRow
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.observability import audit
from tests.conftest import TokenFactory, auth, running_app

SESSIONS = "/api/v1/sessions"
FIELDS = {
    "id",
    "tenant_id",
    "user_id",
    "agent_id",
    "state",
    "metadata",
    "created_at",
    "last_activity_at",
    "expires_at",
}


def _time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, f"{value} has no time zone"
    return moment


async def _create(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> Any:
    response = await client.post(SESSIONS, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def _ids(client: httpx.AsyncClient, headers: dict[str, str], **params: Any) -> list[str]:
    response = await client.get(SESSIONS, params={"limit": 100, **params}, headers=headers)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def _row_count(client: httpx.AsyncClient, table: type[Any]) -> int:
    factory = client.app.state.core.db_factory  # type: ignore[attr-defined]
    async with factory() as db:
        return int((await db.execute(select(func.count()).select_from(table))).scalar_one())


async def _audit(client: httpx.AsyncClient, tenant: str, session_id: str) -> list[AuditEntryRow]:
    factory = client.app.state.core.db_factory  # type: ignore[attr-defined]
    async with factory() as db:
        return await AuditRepository(db).list_for_resource(tenant, session_id)


def _fields_named(response: httpx.Response) -> set[str]:
    return {item["field"] for item in response.json()["error"]["details"]}


async def test_create_returns_every_field(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    headers = auth(make_token(tenant="tenant-a", user="user-1"))
    body = await _create(client, headers, agent_id="agent-7", metadata={"channel": "web", "n": 2})

    assert set(body) == FIELDS
    assert uuid.UUID(body["id"])
    assert body["tenant_id"] == "tenant-a"
    assert body["user_id"] == "user-1"
    assert body["agent_id"] == "agent-7"
    assert body["state"] == "active"
    assert body["metadata"] == {"channel": "web", "n": 2}
    created = _time(body["created_at"])
    assert _time(body["last_activity_at"]) == created
    assert _time(body["expires_at"]) - created == timedelta(seconds=settings.session_ttl)

    read = await client.get(f"{SESSIONS}/{body['id']}", headers=headers)
    assert read.status_code == 200
    assert read.json() == body


async def test_create_with_empty_body_has_defaults(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    body = await _create(client, auth(make_token()))
    assert body["agent_id"] is None
    assert body["metadata"] == {}


async def test_paging_default_size_max_size_and_cursor(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = make_backend_settings(default_page_size=2, max_page_size=5)
    headers = auth(make_token())
    async with running_app(settings) as client:
        created = [(await _create(client, headers, metadata={"i": i}))["id"] for i in range(7)]

        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"cursor": cursor} if cursor else {}
            response = await client.get(SESSIONS, params=params, headers=headers)
            assert response.status_code == 200, response.text
            page = response.json()
            assert set(page) == {"items", "next_cursor"}
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            pages += 1
            if pages == 1:
                # A session created mid-paging lands before the cursor: no duplicate, no gap.
                await _create(client, headers)
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 4
        assert len(seen) == len(set(seen)), "a session was listed twice"
        assert seen == list(reversed(created)), "newest first, nothing missing"

        at_max = await client.get(SESSIONS, params={"limit": 5}, headers=headers)
        assert at_max.status_code == 200
        assert len(at_max.json()["items"]) == 5

        over = await client.get(SESSIONS, params={"limit": 6}, headers=headers)
        assert over.status_code == 422
        assert over.json()["error"]["code"] == "validation_error"
        assert "limit" in _fields_named(over)

        zero = await client.get(SESSIONS, params={"limit": 0}, headers=headers)
        assert zero.status_code == 422
        assert "limit" in _fields_named(zero)


def _forged_cursor(stamp: str) -> str:
    raw = f"{stamp}|{uuid.uuid4()}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_bad_cursor_is_422(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    headers = auth(make_token(scopes=["admin"]))
    await _create(client, headers)
    # The last two are well-formed but name a moment with no UTC time (before year 1,
    # after 9999): they once got as far as the database layer and came back as a 500.
    cursors = [
        "garbage!!",
        "bm90LWEtY3Vyc29y",
        "MjAyNC0wMS0wMXxub3QtYS11dWlk",
        "x" * 600,
        _forged_cursor("0001-01-01T00:00:00+14:00"),
        _forged_cursor("9999-12-31T23:59:59-14:00"),
    ]
    for listing in (SESSIONS, "/api/v1/tasks", "/api/v1/batch"):
        for cursor in cursors:
            response = await client.get(listing, params={"cursor": cursor}, headers=headers)
            assert response.status_code == 422, (listing, cursor, response.text)
            error = response.json()["error"]
            assert error["code"] == "validation_error"
            [detail] = error["details"]
            assert (detail["field"], detail["in"]) == ("cursor", "query"), detail
            assert detail["message"]


async def test_state_filter_and_expiry(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    # SESSION_TTL=1 for the sessions that are to expire; the checks then run on an app with
    # the usual TTL over the same database, so nothing else expires while they run.
    async with running_app(make_backend_settings(session_ttl=1)) as short_lived:
        created = await _create(short_lived, headers)
        stale = created["id"]
        closed = (await _create(short_lived, headers))["id"]
        response = await short_lived.delete(f"{SESSIONS}/{closed}", headers=headers)
        assert response.status_code == 200
    remaining = (_time(created["expires_at"]) - datetime.now(UTC)).total_seconds()
    await asyncio.sleep(max(0.0, remaining) + 0.1)  # past expires_at, without any write

    async with running_app(make_backend_settings()) as client:
        fresh = (await _create(client, headers))["id"]

        read = await client.get(f"{SESSIONS}/{stale}", headers=headers)
        assert read.status_code == 200
        assert read.json()["state"] == "expired"
        assert await _ids(client, headers, state="expired") == [stale]
        assert await _ids(client, headers, state="active") == [fresh]
        assert await _ids(client, headers, state="closed") == [closed]
        assert await _ids(client, headers, state="processing") == []
        assert await _ids(client, headers) == [fresh, closed, stale]

        patched = await client.patch(f"{SESSIONS}/{stale}", json={"metadata": {}}, headers=headers)
        assert patched.status_code == 409
        assert patched.json()["error"]["code"] == "conflict"

        # An expired session can still be closed, and is then kept as closed.
        closing = await client.delete(f"{SESSIONS}/{stale}", headers=headers)
        assert closing.status_code == 200
        assert closing.json()["state"] == "closed"
        assert await _ids(client, headers, state="expired") == []


async def test_unknown_state_filter_is_422(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    response = await client.get(SESSIONS, params={"state": "sleeping"}, headers=auth(make_token()))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert "state" in _fields_named(response)


async def test_patch_metadata_and_agent_slides_expiry(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    headers = auth(make_token())
    before = await _create(client, headers, agent_id="a1", metadata={"old": True})
    await asyncio.sleep(0.05)

    response = await client.patch(
        f"{SESSIONS}/{before['id']}",
        json={"metadata": {"new": 1}, "agent_id": "a2"},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    after = response.json()
    assert after["metadata"] == {"new": 1}
    assert after["agent_id"] == "a2"
    assert after["state"] == "active"
    assert after["created_at"] == before["created_at"]
    assert _time(after["last_activity_at"]) > _time(before["last_activity_at"])
    assert _time(after["expires_at"]) > _time(before["expires_at"])
    assert _time(after["expires_at"]) - _time(after["last_activity_at"]) == timedelta(
        seconds=settings.session_ttl
    )
    assert (await client.get(f"{SESSIONS}/{before['id']}", headers=headers)).json() == after

    only_agent = await client.patch(
        f"{SESSIONS}/{before['id']}", json={"agent_id": "a3"}, headers=headers
    )
    assert only_agent.json()["agent_id"] == "a3"
    assert only_agent.json()["metadata"] == {"new": 1}, "an absent field is left alone"


async def test_patch_refuses_protected_fields(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    original = await _create(client, headers, metadata={"keep": "me"})
    for field, value in (("tenant_id", "tenant-b"), ("state", "closed"), ("user_id", "mallory")):
        response = await client.patch(
            f"{SESSIONS}/{original['id']}",
            json={field: value, "metadata": {"changed": True}},
            headers=headers,
        )
        assert response.status_code == 422, (field, response.text)
        assert response.json()["error"]["code"] == "validation_error"
        assert field in _fields_named(response)
        assert field in response.json()["error"]["message"]
    unchanged = await client.get(f"{SESSIONS}/{original['id']}", headers=headers)
    assert unchanged.json() == original


async def test_wrong_types_are_422_and_nothing_is_written(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    existing = await _create(client, headers, agent_id="a1", metadata={"k": "v"})
    listed = await client.get(SESSIONS, headers=headers)
    rows = await _row_count(client, SessionRow)

    bad_bodies: list[tuple[Any, str]] = [
        ({"metadata": "not-an-object"}, "metadata"),
        ({"agent_id": 42}, "agent_id"),
        ({"agent_id": ""}, "agent_id"),
        ({"unknown_field": 1}, "unknown_field"),
    ]
    for body, field in bad_bodies:
        for method, url in (("POST", SESSIONS), ("PATCH", f"{SESSIONS}/{existing['id']}")):
            response = await client.request(method, url, json=body, headers=headers)
            assert response.status_code == 422, (method, body, response.text)
            assert response.json()["error"]["code"] == "validation_error"
            assert field in _fields_named(response), (method, body)

    # Text no database here can store: NUL (PostgreSQL refuses it in text and jsonb) and a
    # lone surrogate (no UTF-8 for it), wherever it is in the body. Sent as raw JSON: a
    # client library would not even encode the surrogate.
    unstorable: list[tuple[bytes, str]] = [
        (b'{"agent_id": "a\\u0000b"}', "agent_id"),
        (b'{"metadata": {"k": "v\\u0000"}}', "metadata"),
        (b'{"metadata": {"k\\u0000": 1}}', "metadata"),
        (b'{"metadata": {"deep": [{"x": "\\ud800"}]}}', "metadata"),
        (b'{"agent_id": "\\udfff"}', "agent_id"),
        # Not JSON, but Python's reader takes them; PostgreSQL's jsonb does not.
        (b'{"metadata": {"x": NaN}}', "metadata"),
        (b'{"metadata": {"x": [1, -Infinity]}}', "metadata"),
        (b'{"metadata": {"x": {"y": 1e400}}}', "metadata"),
        # Deeper than MAX_JSON_DEPTH (32): stored, it made every answer carrying it a 500.
        (b'{"metadata": {"x": ' + b"[" * 40 + b"]" * 40 + b"}}", "metadata"),
    ]
    as_json = {**headers, "content-type": "application/json"}
    for raw, field in unstorable:
        for method, url in (("POST", SESSIONS), ("PATCH", f"{SESSIONS}/{existing['id']}")):
            response = await client.request(method, url, content=raw, headers=as_json)
            assert response.status_code == 422, (method, raw, response.text)
            assert field in _fields_named(response), (method, raw)
            said = response.json()["error"]["details"][0]["message"]
            reasons = ("NUL", "lone surrogate", "finite", "nesting deeper")
            assert any(why in said for why in reasons), said

    not_json = await client.post(
        SESSIONS, content=b"{not json", headers={**headers, "content-type": "application/json"}
    )
    assert not_json.status_code == 422
    not_a_uuid = await client.get(f"{SESSIONS}/not-a-uuid", headers=headers)
    assert not_a_uuid.status_code == 422
    assert "session_id" in _fields_named(not_a_uuid)

    assert (await client.get(SESSIONS, headers=headers)).json() == listed.json()
    assert await _row_count(client, SessionRow) == rows
    read = await client.get(f"{SESSIONS}/{existing['id']}", headers=headers)
    assert read.json() == existing


async def test_oversized_body_is_413_and_nothing_is_written(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    headers = {**auth(make_token()), "content-type": "application/json"}
    async with running_app(make_backend_settings(max_request_bytes=512)) as client:
        await _create(client, headers, metadata={"fits": "x" * 300})
        before = await _ids(client, headers)
        big = b'{"metadata": {"blob": "' + b"x" * 2000 + b'"}}'

        with_length = await client.post(SESSIONS, content=big, headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 100):
                yield big[start : start + 100]

        chunked = await client.post(SESSIONS, content=chunks(), headers=headers)
        assert "content-length" not in chunked.request.headers
        assert chunked.request.headers["transfer-encoding"] == "chunked"

        for response in (with_length, chunked):
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["code"] == "payload_too_large"
            assert "512" in error["message"]

        patched = await client.patch(f"{SESSIONS}/{before[0]}", content=chunks(), headers=headers)
        assert patched.status_code == 413
        assert await _ids(client, headers) == before
        assert await _row_count(client, SessionRow) == 1
        read = await client.get(f"{SESSIONS}/{before[0]}", headers=headers)
        assert read.json()["metadata"] == {"fits": "x" * 300}


async def test_close_keeps_the_session_and_forbids_further_changes(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    session = await _create(client, headers, metadata={"topic": "t"})
    url = f"{SESSIONS}/{session['id']}"

    closed = await client.delete(url, headers=headers)
    assert closed.status_code == 200
    assert closed.json()["state"] == "closed"
    assert closed.json()["metadata"] == {"topic": "t"}

    read = await client.get(url, headers=headers)
    assert read.status_code == 200
    assert read.json()["state"] == "closed"
    assert session["id"] in await _ids(client, headers, state="closed")

    for method, body in (("PATCH", {"metadata": {"x": 1}}), ("DELETE", None)):
        refused = await client.request(method, url, json=body, headers=headers)
        assert refused.status_code == 409, (method, refused.text)
        assert refused.json()["error"]["code"] == "conflict"
    assert (await client.get(url, headers=headers)).json() == read.json()


async def test_messages_of_a_new_session_is_an_empty_page(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    session = await _create(client, headers)
    response = await client.get(f"{SESSIONS}/{session['id']}/messages", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}

    missing = await client.get(f"{SESSIONS}/{uuid.uuid4()}/messages", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_writes_are_audited(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    headers = {**auth(make_token(tenant="tenant-a", user="auditor")), "X-Correlation-ID": "c-1"}
    session_id = (await _create(client, headers))["id"]
    await client.patch(f"{SESSIONS}/{session_id}", json={"metadata": {"a": 1}}, headers=headers)
    await client.delete(f"{SESSIONS}/{session_id}", headers=headers)
    refused = await client.delete(f"{SESSIONS}/{session_id}", headers=headers)
    assert refused.status_code == 409

    entries = await _audit(client, "tenant-a", session_id)
    assert [(e.action, e.outcome) for e in entries] == [
        ("session.create", "success"),
        ("session.update", "success"),
        ("session.close", "success"),
        ("session.close", "failure"),
    ]
    assert all(e.actor_id == "auditor" and e.actor_kind == "user" for e in entries)
    assert all(e.resource_type == "session" and e.correlation_id == "c-1" for e in entries)
    assert entries[1].details == {"fields": ["metadata"]}
    assert entries[3].details == {"code": "conflict"}
    assert await _audit(client, "tenant-b", session_id) == []


async def test_audit_entries_of_a_rolled_back_unit_of_work_are_not_written(
    client: httpx.AsyncClient,
) -> None:
    """Entries wait for the commit: a unit of work that rolls back, or fails, writes none,
    and one that commits writes all of its entries."""
    factory = client.app.state.core.db_factory  # type: ignore[attr-defined]
    who = Principal("tenant-a", "auditor", frozenset())
    async with UnitOfWork(factory) as uow:
        audit.record(uow, who, "test.dropped", "thing", "r-1")
        await uow.rollback()
        audit.record(uow, who, "test.kept", "thing", "r-1")
        audit.record(uow, who, "test.kept.too", "thing", "r-1")

    async def fail_after_recording() -> None:
        async with UnitOfWork(factory) as uow:
            audit.record(uow, who, "test.failed", "thing", "r-1")
            raise RuntimeError("the operation failed after recording")

    with pytest.raises(RuntimeError):
        await fail_after_recording()
    async with factory() as db:
        entries = await AuditRepository(db).list_for_resource("tenant-a", "r-1")
    assert sorted(entry.action for entry in entries) == ["test.kept", "test.kept.too"]
