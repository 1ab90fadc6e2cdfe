"""The task API on both backends, with the test task kinds of tests/engine_handlers.py run
by the app's in-process worker: the task view, listing, retries, timeouts, failures,
cancellation, tenancy and scopes, and each task's events as Server-Sent Events."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text, update

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.repositories.tasks import TaskRepository
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.events.models import StreamKey
from agent_orchestrator.models.principal import USER_SCOPES, Principal
from agent_orchestrator.queue.producer import delivery_of
from agent_orchestrator.services.task_ledger import Submission
from tests.conftest import TokenFactory, auth, running_app

TASKS = "/api/v1/tasks"
HANDLERS = ["tests.engine_handlers"]
VIEW_FIELDS = {
    "id",
    "tenant_id",
    "session_id",
    "kind",
    "status",
    "attempt",
    "max_attempts",
    "progress",
    "result",
    "error",
    "cancel_requested",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "service_calls",
}
ENVELOPE = {"id", "type", "tenant_id", "session_id", "task_id", "ts", "data"}
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
SECRET = "secret internal detail"  # what test.crash raises; never shown to a client


def engine_settings(make_backend_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "task_handler_modules": HANDLERS,
        "retry_backoff_initial": 0.05,
        "retry_backoff_max": 0.2,
    }
    return make_backend_settings(**{**values, **overrides})


@pytest.fixture
def settings(make_backend_settings: Callable[..., Settings]) -> Settings:
    return engine_settings(make_backend_settings)


@pytest.fixture
def headers(make_token: TokenFactory) -> dict[str, str]:
    return auth(make_token(tenant="tenant-a", user="user-1"))


def principal(tenant: str = "tenant-a", user: str = "user-1") -> Principal:
    return Principal(tenant, user, frozenset(USER_SCOPES))


async def submit(
    client: httpx.AsyncClient,
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    who: Principal | None = None,
    session_id: str | None = None,
) -> str:
    state = client.app.state.core  # type: ignore[attr-defined]
    async with UnitOfWork(state.db_factory) as uow:
        row, created = await state.ledger.submit(
            uow,
            who or principal(),
            Submission(
                kind=kind,
                queue="bulk" if kind == "test.bulk_sleep" else "interactive",
                input=payload or {},
                session_id=uuid.UUID(session_id) if session_id else None,
            ),
        )
    assert created
    return str(row.id)


async def get_task(
    client: httpx.AsyncClient, headers: dict[str, str], task_id: str
) -> dict[str, Any]:
    response = await client.get(f"{TASKS}/{task_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_for(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    task_id: str,
    statuses: set[str],
    timeout: float = 10.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = await get_task(client, headers, task_id)
        if body["status"] in statuses:
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"task {task_id} is {body['status']}, not {statuses}, after {timeout}s")
        await asyncio.sleep(0.02)


async def runs_of(client: httpx.AsyncClient, task_id: str) -> list[int]:
    """Attempts the handler actually started (tests/engine_handlers.py records them)."""
    state = client.app.state.core  # type: ignore[attr-defined]
    async with state.db_factory() as db:
        # The handlers create it on their first run; a test may ask before any ran.
        await db.execute(
            text(
                "CREATE TABLE IF NOT EXISTS test_runs "
                "(task_id VARCHAR(64), attempt INTEGER, worker TEXT)"
            )
        )
        rows = await db.execute(
            text("SELECT attempt FROM test_runs WHERE task_id = :t ORDER BY attempt"),
            {"t": task_id},
        )
        await db.commit()
        return [int(attempt) for (attempt,) in rows]


def parse_sse(body: str) -> list[dict[str, str]]:
    """Frames as {field: value}; comment lines (keep-alives) are left out."""
    frames = []
    for block in body.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            assert name not in fields, f"field {name} twice in one frame: {block!r}"
            fields[name] = value
        if fields:
            frames.append(fields)
    return frames


async def event_frames(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    task_id: str,
    *,
    last_event_id: str | None = None,
    timeout: float = 10.0,
) -> list[dict[str, str]]:
    """The task's event stream to its end (the transport returns once the stream ends)."""
    extra = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    response = await asyncio.wait_for(
        client.get(f"{TASKS}/{task_id}/events", headers={**headers, **extra}), timeout
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    assert frames[0] == {"retry": "2000"}
    return frames[1:]


def envelopes(frames: list[dict[str, str]]) -> list[dict[str, Any]]:
    result = []
    for frame in frames:
        assert set(frame) == {"id", "event", "data"}, frame
        envelope = json.loads(frame["data"])
        assert set(envelope) == ENVELOPE
        assert envelope["id"] == frame["id"]
        assert envelope["type"] == frame["event"]
        result.append(envelope)
    return result


def _time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None
    return moment


# --- the task view and list -----------------------------------------------------------------
async def test_task_view_while_running_and_when_done(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.4, "steps": 4})

    running = await wait_for(client, headers, task_id, {"running", *TERMINAL})
    assert running["status"] == "running"
    assert running["attempt"] == 1
    assert running["started_at"] is not None
    assert running["finished_at"] is None
    assert running["result"] is None

    done = await wait_for(client, headers, task_id, TERMINAL)
    assert set(done) == VIEW_FIELDS
    assert done["id"] == task_id
    assert done["tenant_id"] == "tenant-a"
    assert done["kind"] == "test.sleep"
    assert done["status"] == "succeeded"
    assert done["attempt"] == 1
    assert done["max_attempts"] == 4  # one attempt plus RETRY_ATTEMPTS (3)
    assert done["progress"] == {"steps_completed": 4, "steps_total": 4}
    assert done["result"] == {"slept": 0.4}
    assert done["error"] is None
    assert done["cancel_requested"] is False
    assert done["service_calls"] == []  # test kinds call no downstream service
    created, started = _time(done["created_at"]), _time(done["started_at"])
    finished, updated = _time(done["finished_at"]), _time(done["updated_at"])
    assert created <= started <= finished
    assert updated >= started
    assert await runs_of(client, task_id) == [1]


async def test_list_pages_and_filters(
    client: httpx.AsyncClient, headers: dict[str, str], settings: Settings
) -> None:
    response = await client.post("/api/v1/sessions", json={}, headers=headers)
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    in_session = [
        await submit(client, "test.sleep", {"seconds": 0.01}, session_id=session_id)
        for _ in range(2)
    ]
    failed = [await submit(client, "test.fatal") for _ in range(2)]
    succeeded = await submit(client, "test.sleep", {"seconds": 0.01})
    everything = [*in_session, *failed, succeeded]
    for task_id in everything:
        await wait_for(client, headers, task_id, TERMINAL)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(TASKS, params=params, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(everything)
    assert len(seen) == len(set(seen))
    assert pages == 3

    by_session = await client.get(TASKS, params={"session_id": session_id}, headers=headers)
    assert by_session.status_code == 200
    assert sorted(item["id"] for item in by_session.json()["items"]) == sorted(in_session)
    assert all(item["session_id"] == session_id for item in by_session.json()["items"])

    by_status = await client.get(TASKS, params={"status": "failed"}, headers=headers)
    assert sorted(item["id"] for item in by_status.json()["items"]) == sorted(failed)
    both = await client.get(
        TASKS, params={"status": "failed", "session_id": session_id}, headers=headers
    )
    assert both.json()["items"] == []

    too_big = await client.get(TASKS, params={"limit": settings.max_page_size + 1}, headers=headers)
    assert too_big.status_code == 422
    assert too_big.json()["error"]["code"] == "validation_error"
    assert [detail["field"] for detail in too_big.json()["error"]["details"]] == ["limit"]
    bad_status = await client.get(TASKS, params={"status": "sleeping"}, headers=headers)
    assert bad_status.status_code == 422


async def test_tasks_of_one_session_run_one_at_a_time_without_stalling(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """A session's tasks are claimed one at a time, oldest first (for every kind, not
    only chat); when one ends the next starts at once, not when the reconciler finds it."""
    response = await client.post("/api/v1/sessions", json={}, headers=headers)
    session_id = response.json()["id"]
    first = await submit(client, "test.sleep", {"seconds": 0.3}, session_id=session_id)
    second = await submit(client, "test.sleep", {"seconds": 0.01}, session_id=session_id)

    started = time.monotonic()
    done = await wait_for(client, headers, second, TERMINAL, timeout=15)
    took = time.monotonic() - started
    earlier = await get_task(client, headers, first)

    assert earlier["status"] == done["status"] == "succeeded"
    assert _time(done["started_at"]) >= _time(earlier["finished_at"])
    assert took < 3, f"the session's next task waited {took:.1f}s to start"


# --- retries, timeouts, failures ------------------------------------------------------------
async def test_retryable_failures_are_retried_until_success(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.flaky", {"succeed_on": 3})

    done = await wait_for(client, headers, task_id, TERMINAL)

    assert done["status"] == "succeeded"
    assert done["attempt"] == 3
    assert done["result"] == {"attempt": 3}
    assert done["error"] is None
    assert await runs_of(client, task_id) == [1, 2, 3]
    statuses = [
        e["data"]["status"] for e in envelopes(await event_frames(client, headers, task_id))
    ]
    assert statuses == [
        "queued",
        "running",
        "queued",  # retry 1, with the error that caused it
        "running",
        "queued",
        "running",
        "succeeded",
    ]


async def test_a_task_that_overruns_its_timeout_is_timed_out(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = engine_settings(make_backend_settings, task_timeout=0.5)
    headers = auth(make_token())
    async with running_app(settings) as client:
        task_id = await submit(client, "test.sleep", {"seconds": 30})
        started = time.monotonic()
        done = await wait_for(client, headers, task_id, TERMINAL)

    assert done["status"] == "timed_out"
    assert time.monotonic() - started < 5
    assert done["attempt"] == 1  # a timeout is not retried
    assert done["error"]["code"] == "timeout"
    assert done["result"] is None


async def test_a_fatal_error_fails_at_once(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.fatal")

    done = await wait_for(client, headers, task_id, TERMINAL)

    assert done["status"] == "failed"
    assert done["attempt"] == 1
    assert done["error"] == {"code": "bad_input", "message": "this cannot work", "retryable": False}
    assert await runs_of(client, task_id) == [1]


async def test_a_crash_fails_without_leaking_internals(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.crash")

    done = await wait_for(client, headers, task_id, TERMINAL)

    assert done["status"] == "failed"
    assert done["attempt"] == 1  # an unexpected error is not retried
    assert done["error"]["code"] == "internal_error"
    assert done["error"]["retryable"] is False
    view = await client.get(f"{TASKS}/{task_id}", headers=headers)
    listing = await client.get(TASKS, headers=headers)
    stream = await client.get(f"{TASKS}/{task_id}/events", headers=headers)
    # Each really shows the crashed task and its error (an error page would pass below).
    assert [item["id"] for item in listing.json()["items"]] == [task_id]
    assert listing.json()["items"][0]["error"]["code"] == "internal_error"
    assert view.json()["error"]["code"] == "internal_error"
    final = envelopes(parse_sse(stream.text)[1:])[-1]
    assert final["data"]["status"] == "failed"
    assert final["data"]["error"]["code"] == "internal_error"
    for response in (view, listing, stream):
        assert response.status_code == 200, response.text
        assert SECRET not in response.text
        assert "RuntimeError" not in response.text
        assert "Traceback" not in response.text


# --- cancellation ------------------------------------------------------------------------
async def test_cancel_a_running_task(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 30, "steps": 300})
    await wait_for(client, headers, task_id, {"running"})

    asked = time.monotonic()
    response = await client.post(f"{TASKS}/{task_id}/cancel", headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["id"] == task_id
    assert response.json()["cancel_requested"] is True

    done = await wait_for(client, headers, task_id, TERMINAL, timeout=5)
    took = time.monotonic() - asked
    assert done["status"] == "cancelled"
    assert took < 1.5, f"cancelling took {took:.2f}s"
    assert done["finished_at"] is not None
    assert done["error"] is None
    assert done["result"] is None

    again = await client.post(f"{TASKS}/{task_id}/cancel", headers=headers)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


async def test_cancel_a_queued_task_stops_it_from_ever_running(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = engine_settings(make_backend_settings, max_concurrent_tasks=1)
    headers = auth(make_token())
    async with running_app(settings) as client:
        state = client.app.state.core  # type: ignore[attr-defined]
        busy = await submit(client, "test.sleep", {"seconds": 30, "steps": 300})
        await wait_for(client, headers, busy, {"running"})
        waiting = await submit(client, "test.sleep", {"seconds": 0.01})
        assert (await get_task(client, headers, waiting))["status"] == "queued"

        response = await client.post(f"{TASKS}/{waiting}/cancel", headers=headers)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "cancelled"

        # Free the worker; it then takes the cancelled task's delivery and must drop it.
        freed = await client.post(f"{TASKS}/{busy}/cancel", headers=headers)
        assert freed.status_code == 202
        await wait_for(client, headers, busy, TERMINAL)
        async with state.db_factory() as db:
            row = await TaskRepository(db).get("tenant-a", uuid.UUID(waiting))
        assert row is not None
        deadline = time.monotonic() + 5
        while await state.queue.is_pending(delivery_of(row)):
            assert time.monotonic() < deadline, "the worker never took the delivery"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)

        done = await get_task(client, headers, waiting)
        assert done["status"] == "cancelled"
        assert done["attempt"] == 0
        assert done["started_at"] is None
        assert await runs_of(client, waiting) == []


async def test_cancel_a_finished_task_is_a_conflict(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.01})
    await wait_for(client, headers, task_id, TERMINAL)

    response = await client.post(f"{TASKS}/{task_id}/cancel", headers=headers)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert (await get_task(client, headers, task_id))["status"] == "succeeded"


# --- tenancy and scopes ----------------------------------------------------------------------
async def test_another_tenant_sees_nothing(
    client: httpx.AsyncClient, headers: dict[str, str], make_token: TokenFactory
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.01})
    await wait_for(client, headers, task_id, TERMINAL)
    running = await submit(client, "test.sleep", {"seconds": 30, "steps": 300})
    await wait_for(client, headers, running, {"running"})
    theirs = await submit(client, "test.sleep", {"seconds": 0.01}, who=principal("tenant-b"))
    outsiders = {
        "other tenant": auth(make_token(tenant="tenant-b", user="user-1")),
        "other user": auth(make_token(tenant="tenant-a", user="user-2")),
    }

    for who, other in outsiders.items():
        for target in (task_id, running):
            for method, path in (
                ("GET", f"{TASKS}/{target}"),
                ("GET", f"{TASKS}/{target}/events"),
                ("POST", f"{TASKS}/{target}/cancel"),
            ):
                response = await client.request(method, path, headers=other)
                assert response.status_code == 404, (who, method, path, response.text)
                assert response.json()["error"]["code"] == "not_found"
        listed = await client.get(TASKS, headers=other)
        assert listed.status_code == 200
        ids = {item["id"] for item in listed.json()["items"]}
        assert not ids & {task_id, running}, who
    tenant_b = await client.get(TASKS, headers=outsiders["other tenant"])
    assert [item["id"] for item in tenant_b.json()["items"]] == [theirs]

    # The refused cancel changed nothing; the owner can still cancel.
    assert (await get_task(client, headers, running))["status"] == "running"
    assert (await get_task(client, headers, running))["cancel_requested"] is False
    unknown = await client.get(f"{TASKS}/{uuid.uuid4()}", headers=headers)
    assert unknown.status_code == 404
    assert (await client.post(f"{TASKS}/{running}/cancel", headers=headers)).status_code == 202


async def test_scopes_are_checked(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.01})
    no_tasks = auth(make_token(scopes=["sessions:read", "sessions:write"]))
    read_only = auth(make_token(scopes=["tasks:read"]))

    for method, path in (
        ("GET", TASKS),
        ("GET", f"{TASKS}/{task_id}"),
        ("GET", f"{TASKS}/{task_id}/events"),
        ("POST", f"{TASKS}/{task_id}/cancel"),
    ):
        response = await client.request(method, path, headers=no_tasks)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "forbidden"
    assert (await client.get(f"{TASKS}/{task_id}", headers=read_only)).status_code == 200
    refused = await client.post(f"{TASKS}/{task_id}/cancel", headers=read_only)
    assert refused.status_code == 403
    assert (await client.get(f"{TASKS}/{task_id}")).status_code == 401


# --- events (SSE) ------------------------------------------------------------------------
async def test_event_stream_carries_every_state_change(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.3, "steps": 3})

    # Opened while the task is queued or running; it ends by itself after the final event.
    frames = await event_frames(client, headers, task_id)

    events = envelopes(frames)
    ids = [int(event["id"]) for event in events]
    assert all(later > earlier for earlier, later in itertools.pairwise(ids))
    assert all(event["type"] == "task.status" for event in events)
    assert all(event["task_id"] == task_id for event in events)
    assert all(event["tenant_id"] == "tenant-a" for event in events)
    assert all(event["session_id"] is None for event in events)
    assert all(_time(event["ts"]) for event in events)
    assert [event["data"]["status"] for event in events] == [
        "queued",
        "running",
        "running",
        "running",
        "running",
        "succeeded",
    ]
    progress = [event["data"]["progress"] for event in events[2:5]]
    assert progress == [{"steps_completed": n, "steps_total": 3} for n in (1, 2, 3)]
    assert events[1]["data"]["attempt"] == 1
    assert events[-1]["data"]["result"] == {"slept": 0.3}
    assert events[-1]["data"]["progress"] == {"steps_completed": 3, "steps_total": 3}


async def test_progress_of_steps_finishing_together_is_coalesced_and_ends_complete(
    client: httpx.AsyncClient, headers: dict[str, str], backend: str
) -> None:
    task_id = await submit(client, "test.parallel_steps", {"steps": 5})
    events = envelopes(await event_frames(client, headers, task_id))

    statuses = [event["data"]["status"] for event in events]
    assert statuses[:2] == ["queued", "running"]
    assert statuses[-1] == "succeeded"
    progress = [event["data"]["progress"]["steps_completed"] for event in events[2:-1]]
    assert set(statuses[2:-1]) == {"running"}
    # Never backwards, always ending on the last step, before the terminal event.
    assert progress == sorted(set(progress))
    assert progress[-1] == 5
    assert events[-1]["data"]["progress"] == {"steps_completed": 5, "steps_total": 5}
    if backend == "postgresql":
        # The first caller suspends (on the `running` event, or in its own Redis
        # publish); the four others report meanwhile and share one event after it.
        assert progress in ([5], [1, 5])


async def test_event_stream_resumes_after_last_event_id(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.2, "steps": 2})
    everything = envelopes(await event_frames(client, headers, task_id))
    assert len(everything) == 5

    for seen in range(len(everything) - 1):
        cursor = everything[seen]["id"]
        resumed = envelopes(await event_frames(client, headers, task_id, last_event_id=cursor))
        assert resumed == everything[seen + 1 :], f"resuming after event {seen}"

    by_query = await client.get(
        f"{TASKS}/{task_id}/events", params={"after": everything[1]["id"]}, headers=headers
    )
    assert envelopes(parse_sse(by_query.text)[1:]) == everything[2:]


async def test_event_stream_resumes_mid_task_without_gap_or_duplicate(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """A client that saw the first events while the task ran reconnects mid-task."""
    task_id = await submit(client, "test.sleep", {"seconds": 0.6, "steps": 6})
    await wait_for(client, headers, task_id, {"running"})
    state = client.app.state.core  # type: ignore[attr-defined]
    seen = await state.bus.replay(StreamKey("task", "tenant-a", task_id), None, 100)
    assert seen, "no event yet"
    cursor = seen[-1].id

    rest = envelopes(await event_frames(client, headers, task_id, last_event_id=cursor))

    full = envelopes(await event_frames(client, headers, task_id))
    assert [event.id for event in seen] + [event["id"] for event in rest] == [
        event["id"] for event in full
    ]
    assert rest[-1]["data"]["status"] == "succeeded"


async def test_a_client_that_has_the_final_event_is_told_there_is_no_more(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """An EventSource reconnects whenever a stream ends, sending the last id it saw. After
    the final event that must end at once (204 also stops its reconnecting), not hold the
    connection open for events that will never come."""
    task_id = await submit(client, "test.sleep", {"seconds": 0.01})
    everything = envelopes(await event_frames(client, headers, task_id))
    final = everything[-1]["id"]

    response = await asyncio.wait_for(
        client.get(f"{TASKS}/{task_id}/events", headers={**headers, "Last-Event-ID": final}), 3
    )
    assert response.status_code == 204
    assert response.content == b""
    by_query = await asyncio.wait_for(
        client.get(f"{TASKS}/{task_id}/events", params={"after": final}, headers=headers), 3
    )
    assert by_query.status_code == 204
    # Before the final event it still streams the rest.
    before_final = everything[-2]["id"]
    rest = await event_frames(client, headers, task_id, last_event_id=before_final)
    assert envelopes(rest) == everything[-1:]


async def test_a_finished_task_whose_log_expired_does_not_hang(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.01})
    await wait_for(client, headers, task_id, TERMINAL)
    state = client.app.state.core  # type: ignore[attr-defined]
    await event_frames(client, headers, task_id)  # the final event is in the log by now
    # EVENTS_TTL passes (or Redis loses the log) some time after the task finished.
    if state.redis is not None:
        await state.redis.delete(
            StreamKey("task", "tenant-a", task_id).name(state.settings.redis_namespace)
        )
    else:
        state.bus._streams.clear()
    async with state.db_factory() as db:
        await db.execute(
            update(TaskRow)
            .where(TaskRow.id == uuid.UUID(task_id))
            .values(finished_at=utcnow() - timedelta(hours=25))
        )
        await db.commit()

    response = await asyncio.wait_for(client.get(f"{TASKS}/{task_id}/events", headers=headers), 3)
    assert response.status_code == 204
    assert (await get_task(client, headers, task_id))["status"] == "succeeded"


async def test_a_bad_last_event_id_is_refused(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    task_id = await submit(client, "test.sleep", {"seconds": 0.01})
    for bad in ("abc", "-1", "1.5", "12abc"):
        response = await client.get(
            f"{TASKS}/{task_id}/events", headers={**headers, "Last-Event-ID": bad}
        )
        assert response.status_code == 422, bad
        body = response.json()["error"]
        assert body["code"] == "validation_error"
        assert body["details"][0]["field"] == "Last-Event-ID"
    # "\u0663" is ARABIC-INDIC DIGIT THREE: str.isdigit says yes, but a cursor is ASCII
    # digits and nothing else (the pattern the OpenAPI document gives).
    for bad in ("x", "\u0663", " 5"):
        bad_query = await client.get(
            f"{TASKS}/{task_id}/events", params={"after": bad}, headers=headers
        )
        assert bad_query.status_code == 422, bad
        assert bad_query.json()["error"]["details"][0]["field"] == "after"
    # An empty Last-Event-ID (no cursor) does not wave a bad `after` through.
    both = await client.get(
        f"{TASKS}/{task_id}/events",
        params={"after": "x"},
        headers={**headers, "Last-Event-ID": ""},
    )
    assert both.status_code == 422
    assert both.json()["error"]["details"][0]["field"] == "after"
