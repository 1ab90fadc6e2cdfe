"""`/internal/v1` on both backends: a platform service, with the service token and the
tenant in `X-Tenant-ID`, reads a session's context and publishes events to a session
(and to one of its tasks); a repeated `Idempotency-Key` publishes nothing; the service's
own event types cannot be forged; nothing crosses tenants."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from agent_orchestrator.events.models import Event, StreamKey
from tests.chat_helpers import chat
from tests.conftest import SERVICE_TOKEN, TokenFactory, auth

TENANT = "tenant-a"


def service(tenant: str = TENANT, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_TOKEN}", "X-Tenant-ID": tenant, **extra}


async def a_turn(client: httpx.AsyncClient, make_token: TokenFactory) -> Any:
    answer = await chat(client, auth(make_token()), expect=200, message="hi", mode="wait")
    return answer["task"]


async def log_of(client: httpx.AsyncClient, stream: StreamKey) -> list[Event]:
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    events: list[Event] = await bus.replay(stream, None, 1000)
    return events


async def test_a_service_reads_a_sessions_context(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    task = await a_turn(client, make_token)
    url = f"/internal/v1/sessions/{task['session_id']}/context"
    response = await client.get(url, headers=service())
    assert response.status_code == 200, response.text
    context = response.json()
    assert context["session"]["id"] == task["session_id"]
    assert context["session"]["user_id"] == "user-1"
    assert [m["role"] for m in context["messages"]] == ["user", "assistant"]
    assert context["messages"][0]["content"] == "hi"

    last = (await client.get(url, params={"last": 1}, headers=service())).json()
    assert [m["role"] for m in last["messages"]] == ["assistant"]
    assert (await client.get(url, headers=service("tenant-b"))).status_code == 404
    user = auth(make_token())
    assert (await client.get(url, headers=user)).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token", "X-Tenant-ID": TENANT}
    assert (await client.get(url, headers=wrong)).status_code == 401


async def test_a_service_event_reaches_the_sessions_and_the_tasks_subscribers(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    task = await a_turn(client, make_token)
    session_stream = StreamKey("session", TENANT, task["session_id"])
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    body = {"type": "workflow.progress", "data": {"step": 2, "of": 5}, "task_id": task["id"]}
    async with bus.subscribe(session_stream, replay=False) as live:
        response = await client.post(
            f"/internal/v1/sessions/{task['session_id']}/events", json=body, headers=service()
        )
        assert response.status_code == 202, response.text
        async with asyncio.timeout(5):
            received = await anext(aiter(live))
    assert response.json() == {"id": received.id, "duplicate": False}
    assert received.type == "workflow.progress"
    assert received.tenant_id == TENANT
    assert received.session_id == task["session_id"]
    assert received.task_id == task["id"]
    assert received.data == {"step": 2, "of": 5}
    task_log = await log_of(client, StreamKey("task", TENANT, task["id"]))
    assert task_log[-1].id == received.id  # in the task's log too, after its end


async def test_a_repeated_idempotency_key_publishes_nothing(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    task = await a_turn(client, make_token)
    url = f"/internal/v1/sessions/{task['session_id']}/events"
    body = {"type": "tool.result", "data": {"ok": True}}
    headers = service(**{"Idempotency-Key": "callback-7"})
    first = await client.post(url, json=body, headers=headers)
    again = await client.post(url, json=body, headers=headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "duplicate": True}
    other_key = await client.post(url, json=body, headers=service(**{"Idempotency-Key": "cb-8"}))
    assert other_key.status_code == 202
    logged = await log_of(client, StreamKey("session", TENANT, task["session_id"]))
    assert [e.id for e in logged if e.type == "tool.result"] == [
        first.json()["id"],
        other_key.json()["id"],
    ]


async def test_a_call_must_name_its_tenant(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    task = await a_turn(client, make_token)
    url = f"/internal/v1/sessions/{task['session_id']}/context"
    token_only = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    for headers in (token_only, service(""), service("t" * 129)):
        response = await client.get(url, headers=headers)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert error["details"] == [
            {"field": "X-Tenant-ID", "in": "header", "message": "required, 1-128 characters"}
        ]
    # The token is checked first: a wrong one is a 401 whatever the header.
    response = await client.get(url, headers={"Authorization": "Bearer not-the-token"})
    assert response.status_code == 401
    assert (await client.get(url, headers=service("t" * 128))).status_code == 404


async def test_idempotency_keys_of_two_tenants_never_meet(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """Tenant ids may hold ':'. Joined without their length, tenant `a`, session S1 and key
    `S2:k` made the same once-key as tenant `a:S1`, session S2 and key `k`."""
    first = await chat(client, auth(make_token(tenant="a")), expect=200, message="hi", mode="wait")
    s1 = first["task"]["session_id"]
    other = f"a:{s1}"
    second = await chat(
        client, auth(make_token(tenant=other)), expect=200, message="hi", mode="wait"
    )
    s2 = second["task"]["session_id"]
    body = {"type": "tool.result", "data": {"ok": True}}
    for tenant, session_id, key in ((other, s2, "k"), ("a", s1, f"{s2}:k")):
        response = await client.post(
            f"/internal/v1/sessions/{session_id}/events",
            json=body,
            headers=service(tenant, **{"Idempotency-Key": key}),
        )
        assert response.status_code == 202, (tenant, response.text)
        assert response.json()["duplicate"] is False


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"type": "task.status", "data": {"status": "succeeded"}}, 422, "type"),
        ({"type": "chat.completed"}, 422, "type"),
        ({"type": "system.error"}, 422, "type"),
        ({"type": "Workflow Progress"}, 422, "type"),
        ({"type": "nodot"}, 422, "type"),
        ({"type": "workflow.done", "extra": 1}, 422, "extra"),
    ],
)
async def test_bad_events_are_refused_naming_the_field(
    client: httpx.AsyncClient,
    make_token: TokenFactory,
    body: dict[str, Any],
    status: int,
    field: str,
) -> None:
    task = await a_turn(client, make_token)
    url = f"/internal/v1/sessions/{task['session_id']}/events"
    response = await client.post(url, json=body, headers=service())
    assert response.status_code == status, response.text
    assert field in str(response.json()["error"]["details"])
    logged = await log_of(client, StreamKey("session", TENANT, task["session_id"]))
    assert not [e for e in logged if e.type == body["type"] and e.data == body.get("data")]


async def test_events_stay_within_the_tenant_and_the_session(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    first = await a_turn(client, make_token)
    second = await a_turn(client, make_token)
    url = f"/internal/v1/sessions/{first['session_id']}/events"
    foreign = await client.post(url, json={"type": "a.b"}, headers=service("tenant-b"))
    assert foreign.status_code == 404
    elsewhere = {"type": "a.b", "task_id": second["id"]}  # a task of another session
    response = await client.post(url, json=elsewhere, headers=service())
    assert response.status_code == 404
    assert response.json()["error"]["details"] == {"task_id": second["id"]}
    logged = await log_of(client, StreamKey("session", TENANT, first["session_id"]))
    assert [e for e in logged if e.type == "a.b"] == []


async def test_an_event_posted_after_its_task_ended_does_not_hold_a_resumed_stream_open(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """A service's late event for a finished task lands after the task's terminal event.
    A client resuming from that terminal event (as an EventSource does) gets the late
    event and the end of the stream; it waited for a terminal event that had gone by."""
    task = await a_turn(client, make_token)
    stream = StreamKey("task", TENANT, task["id"])
    terminal = (await log_of(client, stream))[-1]
    assert terminal.data["status"] == "succeeded"
    body = {"type": "tool.result", "data": {"late": True}, "task_id": task["id"]}
    url = f"/internal/v1/sessions/{task['session_id']}/events"
    late = await client.post(url, json=body, headers=service())
    assert late.status_code == 202, late.text
    headers = {**auth(make_token()), "Last-Event-ID": terminal.id}
    async with asyncio.timeout(5):  # it ends: no waiting for a final event
        response = await client.get(f"/api/v1/tasks/{task['id']}/events", headers=headers)
    assert response.status_code == 200, response.text
    ids = [line[4:] for line in response.text.splitlines() if line.startswith("id: ")]
    assert ids == [late.json()["id"]]
    after_it = {**auth(make_token()), "Last-Event-ID": late.json()["id"]}
    done = await client.get(f"/api/v1/tasks/{task['id']}/events", headers=after_it)
    assert done.status_code == 204
