"""The chat API in the embedded default (issue 4), on both backends, with no downstream
configured: local conversation and agent providers on our database and the echo model.

Modes (wait, stream, async), history across turns, messages, sessions and tenancy,
Idempotency-Key, the busy-session policies (reject, enqueue, interrupt), cancel
mid-stream, validation, scopes, agents from AGENTS_FILE (a required service that is
missing fails the turn; a missing optional one degrades it), and the statements a turn
costs.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from agent_orchestrator.config import Settings
from agent_orchestrator.db.repositories.audit import AuditRepository
from agent_orchestrator.db.repositories.messages import MessageRepository
from agent_orchestrator.db.repositories.tasks import TaskRepository
from agent_orchestrator.db.tables import MessageRow, SessionRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.events.models import EventType, StreamKey
from agent_orchestrator.queue import producer
from agent_orchestrator.queue.base import Delivery
from tests.chat_helpers import (
    CHAT,
    SESSIONS,
    TASKS,
    chat,
    check_stream_shape,
    events_of,
    first_chunk,
    messages,
    settled,
    stream_turn,
    task_view,
)
from tests.conftest import TokenFactory, auth, running_app
from tests.processes import parse_sse
from tests.sql_trace import statements_sent

#: A message long enough that, at ECHO_CHUNK_DELAY 0.05 s, the echo reply streams for ~3 s.
LONG = " ".join(f"word{i}" for i in range(60))


async def count(client: httpx.AsyncClient, table: type[Any], **where: Any) -> int:
    factory = client.app.state.core.db_factory  # type: ignore[attr-defined]
    query = select(func.count()).select_from(table)
    for name, value in where.items():
        query = query.where(getattr(table, name) == value)
    async with factory() as db:
        return int((await db.execute(query)).scalar_one())


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --- the three modes -------------------------------------------------------------------------
async def test_wait_returns_the_echo_reply(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    body = await chat(client, headers, expect=200, message="hello there", mode="wait")

    assert body["task"]["status"] == "succeeded"
    assert body["task"]["kind"] == "chat"
    message = body["message"]
    assert message["role"] == "assistant"
    assert "hello there" in message["content"]
    assert "echo model" in message["content"]
    assert message["task_id"] == body["task"]["id"]
    assert message["metadata"]["model"] == "echo"
    assert message["metadata"]["degraded"] == []
    assert body["task"]["result"]["content"] == message["content"]


async def test_wait_answer_is_what_the_ledger_holds_and_needs_no_read_back(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """The worker of this process hands the finished turn to the waiting request: the
    answer must equal what the task and message endpoints read from the database after,
    and the request must not have read the turn back (no SELECT on service_calls, which
    only the task view reads)."""
    headers = auth(make_token())
    state = client.app.state.core  # type: ignore[attr-defined]
    with statements_sent(state) as sent:
        body = await chat(client, headers, expect=200, message="hand it over", mode="wait")
    read_calls = [text for text in sent if text.startswith("select") and "service_calls" in text]
    assert any("insert into service_calls" in text for text in sent)  # the trace sees the turn
    assert read_calls == []

    assert body["task"] == await task_view(client, headers, body["task"]["id"])
    listed = await messages(client, headers, body["task"]["session_id"])
    assert listed[-1] == body["message"]
    assert [call["step"] for call in body["task"]["service_calls"]] == [
        "history",
        "agent",
        "knowledge",
        "generate",
    ]


async def test_a_new_wait_turn_is_followed_live_and_a_repeat_read_back(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new turn's events are followed from before the commit that publishes its first
    one, so nothing is read back from the log (an XRANGE on Redis); the repeat of a key
    whose turn has ended reads the turn back at once, with nothing to follow (its log
    may be long gone), and gets the same answer."""
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    replays: list[str] = []
    original = bus.replay

    async def counted(stream: StreamKey, after: int | None, limit: int) -> Any:
        replays.append(stream.resource_id)
        return await original(stream, after, limit)

    monkeypatch.setattr(bus, "replay", counted)
    headers = {**auth(make_token()), "Idempotency-Key": "wait-once"}
    first = await chat(client, headers, expect=200, message="follow me", mode="wait")
    assert first["task"]["status"] == "succeeded"
    assert replays == []

    again = await chat(client, headers, expect=200, message="follow me", mode="wait")
    assert again["task"]["id"] == first["task"]["id"]
    assert again["message"] == first["message"]
    assert replays == []


def _statement_kinds(text: str) -> list[tuple[str, str]]:
    """[('insert', 'tasks')], [('select', 'messages')], [('begin', '')] ... of a traced
    statement; a WITH statement's data-modifying parts each, and its own."""
    if text.startswith("with "):
        return [
            ("insert", inserted) if inserted else ("update", updated)
            for inserted, updated in WRITES.findall(text)
        ]
    words = text.replace("(", " ").split()
    verb = words[0]
    if verb == "insert":
        return [(verb, words[2])]
    if verb == "update":
        return [(verb, words[1])]
    return [(verb, words[words.index("from") + 1] if "from" in words else "")]


WRITES = re.compile(r"\binsert into (\w+)|\bupdate (\w+) set\b")


#: The database work of one `mode=wait` turn in a new session; on PostgreSQL each entry
#: is one statement and one round trip, with no BEGIN or COMMIT around any of them.
WAIT_TURN_WORK = [
    # the API's transaction, at its commit (db/held_inserts.py)
    [
        ("insert", "tasks"),
        ("insert", "sessions"),
        ("insert", "messages"),
        ("insert", "audit_entries"),
    ],
    # the claim: the task and its session (db/repositories/task_session.py)
    [("update", "tasks"), ("update", "sessions")],
    # the plan's reads: history and agent, concurrently
    [("select", "messages")],
    [("select", "agents")],
    # the turn's end (db/repositories/turn_end.py): the steps' records, reply, task, session
    [
        ("insert", "service_calls"),
        ("insert", "messages"),
        ("update", "tasks"),
        ("update", "sessions"),
    ],
    # the look for a turn queued next in the session
    [("select", "tasks")],
]


async def test_a_wait_turn_costs_these_statements(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """The database work of one turn in a new session, the hot path's budget (above),
    and on PostgreSQL its round trips. A round trip more per turn must be a decision,
    made here and in docs/architecture.md."""
    settings = make_backend_settings(reconcile_interval=300)  # no sweep in the window
    async with running_app(settings) as client:
        headers = auth(make_token())
        state = client.app.state.core  # type: ignore[attr-defined]
        await chat(client, headers, expect=200, message="warm up", mode="wait")
        await asyncio.sleep(0.2)  # the warm-up turn's last lookup
        with statements_sent(state) as sent:
            await chat(client, headers, expect=200, message="count me", mode="wait")
            deadline = time.monotonic() + 5
            while ("select", "tasks") not in itertools.chain(*map(_statement_kinds, sent)):
                assert time.monotonic() < deadline, sent
                await asyncio.sleep(0.01)
    statements = [_statement_kinds(text) for text in sent]
    work = list(itertools.chain(*statements))
    if settings.database_url is None:  # SQLite: BEGIN and COMMIT do not leave the process
        work = [kind for kind in work if kind[0] not in ("begin", "commit")]
        # Its trace shows an executemany once per row: one statement per run.
        work = [kind for i, kind in enumerate(work) if i == 0 or kind != work[i - 1]]
    else:
        grouped = sorted(map(sorted, statements))
        assert grouped == sorted(map(sorted, WAIT_TURN_WORK)), sent
    assert sorted(work) == sorted(itertools.chain(*WAIT_TURN_WORK)), sent


async def test_stream_yields_chunks_then_completed_then_status(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    frames = await stream_turn(client, auth(make_token()), message="stream me please")
    reply = check_stream_shape(frames)
    assert "stream me please" in reply
    assert "echo model" in reply
    session_id = frames[0]["envelope"]["session_id"]
    stored = await messages(client, auth(make_token()), session_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == reply


async def test_async_then_the_task_shows_its_service_calls(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    accepted = await chat(client, headers, message="async hello")

    assert set(accepted) == {"task_id", "session_id", "status", "events_url"}
    assert accepted["status"] == "queued"
    assert accepted["events_url"] == f"{TASKS}/{accepted['task_id']}/events"
    view = await settled(client, headers, accepted["task_id"])
    assert view["status"] == "succeeded", view
    assert view["session_id"] == accepted["session_id"]
    calls = {call["step"]: call for call in view["service_calls"]}
    assert set(calls) == {"history", "agent", "knowledge", "generate"}
    for step, service in [
        ("history", "conversation"),
        ("agent", "agent_management"),
        ("generate", "agent_execution"),
    ]:
        assert calls[step]["service"] == service
        assert calls[step]["status"] == "succeeded"
        assert calls[step]["attempts"] == 1
    assert calls["knowledge"]["status"] == "skipped"  # the default agent has no knowledge
    assert view["progress"] == {"steps_completed": 4, "steps_total": 4}

    # The events URL replays the whole turn.
    events = await client.get(accepted["events_url"], headers=headers)
    kinds = [frame["event"] for frame in parse_sse(events.text.splitlines()) if "event" in frame]
    assert "chat.stream" in kinds
    assert kinds[-2:] == ["chat.completed", "task.status"]


async def test_second_turn_sees_the_first_and_messages_are_listed_in_order(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    first = await chat(client, headers, expect=200, message="first question", mode="wait")
    session_id = first["task"]["session_id"]
    assert "earlier messages" not in first["message"]["content"]

    second = await chat(
        client, headers, expect=200, message="second question", session_id=session_id, mode="wait"
    )
    assert second["task"]["session_id"] == session_id
    assert "I can see 2 earlier messages" in second["message"]["content"]

    listed = await messages(client, headers, session_id)
    assert [(m["role"], m["task_id"]) for m in listed] == [
        ("user", first["task"]["id"]),
        ("assistant", first["task"]["id"]),
        ("user", second["task"]["id"]),
        ("assistant", second["task"]["id"]),
    ]
    assert listed[0]["content"] == "first question"
    assert listed[1]["content"] == first["message"]["content"]
    assert listed[2]["content"] == "second question"
    assert listed[3]["content"] == second["message"]["content"]


async def _audit_actions(client: httpx.AsyncClient, resource_id: str) -> list[tuple[str, str]]:
    factory = client.app.state.core.db_factory  # type: ignore[attr-defined]
    async with factory() as db:
        entries = await AuditRepository(db).list_for_resource("tenant-a", resource_id)
    return [(entry.action, entry.outcome) for entry in entries]


async def test_no_session_id_creates_a_session(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = {**auth(make_token(tenant="tenant-a", user="user-9")), "X-Correlation-ID": "c-7"}
    accepted = await chat(client, headers, message="new conversation", agent_id="default")
    # Both writes of the request are audited, in its transaction.
    assert await _audit_actions(client, accepted["session_id"]) == [("session.create", "success")]
    assert await _audit_actions(client, accepted["task_id"]) == [("task.submit", "success")]
    factory = client.app.state.core.db_factory  # type: ignore[attr-defined]
    async with factory() as db:
        entry = (await AuditRepository(db).list_for_resource("tenant-a", accepted["task_id"]))[0]
    assert (entry.actor_id, entry.correlation_id, entry.details) == (
        "user-9",
        "c-7",
        {"kind": "chat"},
    )
    response = await client.get(f"{SESSIONS}/{accepted['session_id']}", headers=headers)
    assert response.status_code == 200, response.text
    session = response.json()
    assert session["user_id"] == "user-9"
    assert session["agent_id"] == "default"
    assert (await settled(client, headers, accepted["task_id"]))["status"] == "succeeded"
    # The turn marks its session processing, then active again once it has settled.
    deadline = time.monotonic() + 5
    while (await client.get(f"{SESSIONS}/{accepted['session_id']}", headers=headers)).json()[
        "state"
    ] != "active":
        assert time.monotonic() < deadline, "the session stayed busy after its turn"
        await asyncio.sleep(0.02)


async def test_closed_session_is_409_and_other_tenants_session_is_404(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    a, b = auth(make_token(tenant="tenant-a")), auth(make_token(tenant="tenant-b"))
    session = (await client.post(SESSIONS, json={}, headers=a)).json()
    foreign = await client.post(
        CHAT, json={"message": "hi", "session_id": session["id"]}, headers=b
    )
    assert foreign.status_code == 404, foreign.text

    assert (await client.delete(f"{SESSIONS}/{session['id']}", headers=a)).status_code == 200
    closed = await client.post(CHAT, json={"message": "hi", "session_id": session["id"]}, headers=a)
    assert closed.status_code == 409, closed.text
    assert await count(client, TaskRow) == 0
    assert await count(client, MessageRow) == 0


async def test_idempotency_key_returns_the_same_task_and_stores_one_message(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = {**auth(make_token()), "Idempotency-Key": "turn-42"}
    first = await chat(client, headers, message="only once")
    again = await chat(client, headers, message="only once")
    assert again["task_id"] == first["task_id"]
    assert again["session_id"] == first["session_id"]
    await settled(client, headers, first["task_id"])
    waited = await chat(client, headers, expect=200, message="only once", mode="wait")
    assert waited["task"]["id"] == first["task_id"]
    assert waited["task"]["status"] == "succeeded"

    assert await count(client, TaskRow) == 1
    assert await count(client, SessionRow) == 1
    assert await count(client, MessageRow, role="user") == 1
    assert await count(client, MessageRow, role="assistant") == 1


# --- busy sessions -----------------------------------------------------------------------
async def test_on_busy_reject_is_409_while_a_turn_runs(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    async with running_app(make_backend_settings(echo_chunk_delay=0.05)) as client:
        running = await chat(client, headers, message=LONG)
        await first_chunk(client, "tenant-a", running["task_id"])
        rejected = await client.post(
            CHAT,
            json={"message": "me too", "session_id": running["session_id"], "on_busy": "reject"},
            headers=headers,
        )
        assert rejected.status_code == 409, rejected.text
        assert rejected.json()["error"]["details"]["task_ids"] == [running["task_id"]]
        assert await count(client, TaskRow) == 1
        assert await count(client, MessageRow, role="user") == 1
        assert (await settled(client, headers, running["task_id"]))["status"] == "succeeded"


async def test_on_busy_enqueue_runs_turns_one_at_a_time_in_order(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    async with running_app(make_backend_settings(echo_chunk_delay=0.02)) as client:
        first = await chat(client, headers, message="turn one")
        session_id = first["session_id"]
        rest = [
            await chat(client, headers, message=f"turn {name}", session_id=session_id)
            for name in ("two", "three")
        ]
        views = [await settled(client, headers, accepted["task_id"]) for accepted in [first, *rest]]
        assert [view["status"] for view in views] == ["succeeded"] * 3
        # The session really was busy: the later turns arrived while the first one ran
        # (otherwise one-at-a-time holds with no queueing at all).
        for later in views[1:]:
            assert _time(later["created_at"]) < _time(views[0]["finished_at"]), (views[0], later)
        for earlier, later in itertools.pairwise(views):
            assert _time(earlier["finished_at"]) <= _time(later["started_at"]), (earlier, later)

        listed = await messages(client, headers, session_id)
        replies = [m["content"] for m in listed if m["role"] == "assistant"]
        assert len(replies) == 3
        for name, reply in zip(("one", "two", "three"), replies, strict=True):
            assert f"You said: turn {name}" in reply
        # Each turn saw every earlier one: 0, 2 and 4 earlier messages.
        assert "earlier messages" not in replies[0]
        assert "I can see 2 earlier messages" in replies[1]
        assert "I can see 4 earlier messages" in replies[2]
        # In the order of the conversation (they were stored u1, u2, u3, a1, a2, a3).
        one, two, three = (uuid.UUID(view["id"]) for view in views)
        async with client.app.state.core.db_factory() as db:  # type: ignore[attr-defined]
            history = await MessageRepository(db).latest(
                "tenant-a", uuid.UUID(session_id), 10, exclude_task_id=three
            )
        assert [(m.role, m.task_id) for m in history] == [
            ("user", one),
            ("assistant", one),
            ("user", two),
            ("assistant", two),
        ]


async def test_on_busy_neither_shows_nor_cancels_a_turn_someone_else_sent(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """An admin may send a turn into a user's session; the user's `reject` does not name
    that turn, and `interrupt` does not cancel it on the user's say: both are a 409."""
    alice = auth(make_token(user="alice"))
    admin = auth(make_token(user="ops", scopes=["admin"]))
    async with running_app(make_backend_settings(echo_chunk_delay=0.05)) as client:
        session_id = (await chat(client, alice, expect=200, message="hi", mode="wait"))["task"][
            "session_id"
        ]
        theirs = await chat(client, admin, message=LONG, session_id=session_id)
        await first_chunk(client, "tenant-a", theirs["task_id"])
        for policy in ("reject", "interrupt"):
            refused = await client.post(
                CHAT,
                json={"message": "me", "session_id": session_id, "on_busy": policy},
                headers=alice,
            )
            assert refused.status_code == 409, (policy, refused.text)
            assert refused.json()["error"]["details"] == {
                "session_id": session_id,
                "task_ids": [],
            }
        assert (await settled(client, admin, theirs["task_id"]))["status"] == "succeeded"
        assert await count(client, TaskRow) == 2  # the refused turns wrote nothing


async def test_on_busy_interrupt_of_a_turn_that_ended_meanwhile_goes_on(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running turn ends between the busy check's read and its cancel: there is
    nothing left to interrupt, and the new turn is accepted (it was a 409)."""
    headers = auth(make_token())
    first = await chat(client, headers, expect=200, message="hi", mode="wait")
    session_id = first["task"]["session_id"]
    async with client.app.state.core.db_factory() as db:  # type: ignore[attr-defined]
        ended = await TaskRepository(db).get("tenant-a", uuid.UUID(first["task"]["id"]))
    assert ended is not None
    ended.status = "running"  # as the busy check read it, just before it ended

    async def read_before_it_ended(self: Any, *args: Any) -> list[TaskRow]:
        return [ended]

    monkeypatch.setattr(TaskRepository, "unfinished_in_session", read_before_it_ended)
    newer = await chat(client, headers, message="next", session_id=session_id, on_busy="interrupt")
    assert (await settled(client, headers, newer["task_id"]))["status"] == "succeeded"
    assert (await task_view(client, headers, first["task"]["id"]))["status"] == "succeeded"


async def test_a_turn_the_reconciler_ends_frees_its_session(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """A turn whose worker died is failed or cancelled by the reconciler, where no
    settled hook runs: its session went on saying `processing` (shown by a review)."""
    headers = auth(make_token())
    async with running_app(make_backend_settings(), run_worker=False) as client:
        state = client.app.state.core  # type: ignore[attr-defined]
        accepted = await chat(client, headers, message="hi")
        task_id, session_id = uuid.UUID(accepted["task_id"]), accepted["session_id"]
        assert await state.ledger.claim("tenant-a", task_id, "a-worker-that-dies") is not None
        async with state.db_factory() as db:  # what the claim's session move wrote
            await db.execute(
                update(SessionRow)
                .where(SessionRow.id == uuid.UUID(session_id))
                .values(state="processing")
            )
            await db.execute(
                update(TaskRow)
                .where(TaskRow.id == task_id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1), max_attempts=1)
            )
            await db.commit()
        assert await state.ledger.recover_expired_leases() == 1
        assert (await task_view(client, headers, str(task_id)))["status"] == "failed"
        session = await client.get(f"{SESSIONS}/{session_id}", headers=headers)
    assert session.json()["state"] == "active"


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_turn_racing_the_close_of_its_session_is_refused(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """A close not yet committed when a turn arrives: the turn waits for it, then finds
    the session closed (409); it was accepted into the closed session."""
    headers = auth(make_token())
    async with running_app(make_backend_settings()) as client:
        first = await chat(client, headers, expect=200, message="hi", mode="wait")
        session_id = uuid.UUID(first["task"]["session_id"])
        state = client.app.state.core  # type: ignore[attr-defined]
        async with state.db_factory() as closing:
            await closing.execute(
                update(SessionRow).where(SessionRow.id == session_id).values(state="closed")
            )
            body = {"message": "late", "session_id": str(session_id)}
            racing = asyncio.create_task(client.post(CHAT, json=body, headers=headers))
            await asyncio.sleep(0.3)
            assert not racing.done(), "the turn did not wait for the session's row"
            await closing.commit()
        answer = await racing
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["details"] == {"state": "closed"}


async def test_on_busy_interrupt_cancels_the_running_turn(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    async with running_app(make_backend_settings(echo_chunk_delay=0.05)) as client:
        running = await chat(client, headers, message=LONG)
        await first_chunk(client, "tenant-a", running["task_id"])
        newer = await chat(
            client,
            headers,
            message="never mind",
            session_id=running["session_id"],
            on_busy="interrupt",
        )
        assert (await settled(client, headers, running["task_id"]))["status"] == "cancelled"
        assert (await settled(client, headers, newer["task_id"]))["status"] == "succeeded"
        replies = [
            m
            for m in await messages(client, headers, running["session_id"])
            if m["role"] == "assistant"
        ]
        assert [m["task_id"] for m in replies] == [newer["task_id"]]


async def test_cancel_mid_stream_stops_within_a_second_and_stores_no_reply(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    async with running_app(make_backend_settings(echo_chunk_delay=0.05)) as client:
        accepted = await chat(client, headers, message=LONG)
        await first_chunk(client, "tenant-a", accepted["task_id"])
        asked = time.monotonic()
        response = await client.post(f"{CHAT}/{accepted['task_id']}/cancel", headers=headers)
        assert response.status_code == 202, response.text
        view = await settled(client, headers, accepted["task_id"], timeout=5)
        assert time.monotonic() - asked < 1.0
        assert view["status"] == "cancelled"
        assert await count(client, MessageRow, role="assistant") == 0
        events = await events_of(client, "tenant-a", accepted["task_id"])
        assert EventType.CHAT_COMPLETED not in {event.type for event in events}
        # The session is free again.
        after = await chat(
            client,
            headers,
            expect=200,
            message="hi",
            session_id=accepted["session_id"],
            mode="wait",
        )
        assert after["task"]["status"] == "succeeded"

        again = await client.post(f"{CHAT}/{accepted['task_id']}/cancel", headers=headers)
        assert again.status_code == 409, again.text


# --- bad input and permissions -------------------------------------------------------------
async def test_bad_input_is_422_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    for body, field in [
        ({"message": ""}, "message"),
        ({"message": "hi", "mode": "shout"}, "mode"),
        ({"message": "hi", "colour": "blue"}, "colour"),
        ({"message": "hi", "on_busy": "later"}, "on_busy"),
        ({"message": "hi", "session_id": "not-a-uuid"}, "session_id"),
    ]:
        response = await client.post(CHAT, json=body, headers=headers)
        assert response.status_code == 422, (body, response.text)
        named = {item["field"] for item in response.json()["error"]["details"]}
        assert any(field in name for name in named), (body, named)
    # Text no database can store (NUL; a lone surrogate), as raw JSON escapes.
    as_json = {**headers, "content-type": "application/json"}
    for raw, field in [
        (b'{"message": "hi\\u0000", "mode": "wait"}', "message"),
        (b'{"message": "\\ud800", "mode": "wait"}', "message"),
        (b'{"message": "hi", "agent_id": "x\\u0000"}', "agent_id"),
        (b'{"message": "hi", "metadata": {"tags": ["\\u0000"]}}', "metadata"),
        (b'{"message": "hi", "metadata": {"score": NaN}}', "metadata"),
    ]:
        response = await client.post(CHAT, content=raw, headers=as_json)
        assert response.status_code == 422, (raw, response.text)
        named = {item["field"] for item in response.json()["error"]["details"]}
        assert field in named, (raw, named)
    assert await count(client, TaskRow) == 0
    assert await count(client, SessionRow) == 0
    assert await count(client, MessageRow) == 0


async def test_chat_needs_the_chat_write_scope(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    reader = auth(make_token(scopes=["sessions:read", "tasks:read"]))
    response = await client.post(CHAT, json={"message": "hi"}, headers=reader)
    assert response.status_code == 403, response.text
    assert (await client.post(CHAT, json={"message": "hi"})).status_code == 401
    cancel = await client.post(f"{CHAT}/{uuid.uuid4()}/cancel", headers=reader)
    assert cancel.status_code == 403
    assert await count(client, TaskRow) == 0


# --- agents from AGENTS_FILE ---------------------------------------------------------------
AGENTS_YAML = """
agents:
  - id: researcher
    name: Researcher
    system_prompt: Answer with citations.
    requires: ["query"]
  - id: librarian
    name: Librarian
    system_prompt: Use the handbook.
    knowledge: {collection_ids: ["handbook"], top_k: 3}
"""


async def test_agent_requiring_a_missing_service_fails_with_service_unavailable(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory, tmp_path: Path
) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(AGENTS_YAML)
    headers = auth(make_token())
    async with running_app(make_backend_settings(agents_file=agents)) as client:
        body = await chat(
            client, headers, expect=200, message="cite this", agent_id="researcher", mode="wait"
        )
        assert body["task"]["status"] == "failed", body
        assert body["task"]["error"]["code"] == "service_unavailable"
        assert "query" in body["task"]["error"]["message"]
        assert body["message"] is None
        assert await count(client, MessageRow, role="assistant") == 0
        assert body["task"]["attempt"] == 1  # a configuration error is not retried

        unknown = await chat(
            client, headers, expect=200, message="hi", agent_id="nobody", mode="wait"
        )
        assert unknown["task"]["status"] == "failed"
        assert unknown["task"]["error"]["code"] == "not_found"


async def test_agent_with_knowledge_and_no_query_service_degrades(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory, tmp_path: Path
) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(AGENTS_YAML)
    headers = auth(make_token())
    async with running_app(make_backend_settings(agents_file=agents)) as client:
        body = await chat(
            client, headers, expect=200, message="what is policy", agent_id="librarian", mode="wait"
        )
        task = body["task"]
        assert task["status"] == "succeeded", task
        assert "what is policy" in body["message"]["content"]
        degraded = body["message"]["metadata"]["degraded"]
        assert [item["step"] for item in degraded] == ["knowledge"]
        assert degraded[0]["code"] == "service_unavailable"
        assert task["result"]["degraded"] == degraded

        view = await task_view(client, headers, task["id"])
        calls = {call["step"]: call for call in view["service_calls"]}
        assert calls["knowledge"]["status"] == "failed"
        assert calls["knowledge"]["error"]["code"] == "service_unavailable"
        assert calls["generate"]["status"] == "succeeded"

        events = await events_of(client, "tenant-a", task["id"])
        warnings = [event for event in events if event.type == EventType.SYSTEM_WARNING]
        assert len(warnings) == 1
        assert warnings[0].data["step"] == "knowledge"
        assert warnings[0].data["code"] == "degraded"
        assert warnings[0].data["message"].startswith("knowledge was skipped")
        assert warnings[0].data["error"]["code"] == "service_unavailable"
        kinds = [event.type for event in events]
        assert kinds.index(EventType.SYSTEM_WARNING) < kinds.index(EventType.CHAT_COMPLETED)


async def test_a_turn_queued_by_an_earlier_version_still_marks_its_session(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery from before deliveries named their task's kind and session (queued
    across an upgrade): the claim cannot carry the session's change, which follows it."""

    def earlier_delivery(row: TaskRow) -> Delivery:
        return Delivery(str(row.id), row.tenant_id, row.queue, row.delivery)

    monkeypatch.setattr(producer, "delivery_of", earlier_delivery)
    headers = auth(make_token(tenant="tenant-a"))
    turn = await chat(client, headers, expect=200, message="from before", mode="wait")
    assert turn["task"]["status"] == "succeeded"
    session_id = turn["task"]["session_id"]
    deadline = time.monotonic() + 5
    while len(states := await _session_states(client, "tenant-a", session_id)) < 2:
        assert time.monotonic() < deadline, states
        await asyncio.sleep(0.02)
    assert states == ["processing", "active"]


async def _session_states(client: httpx.AsyncClient, tenant: str, session_id: str) -> list[str]:
    bus = client.app.state.core.bus  # type: ignore[attr-defined]
    events = await bus.replay(StreamKey("session", tenant, session_id), None, 100)
    return [e.data["state"] for e in events if e.type == EventType.SESSION_STATE]


async def test_a_turn_marks_its_session_busy_then_free_once_whether_it_succeeds_or_fails(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """Success frees the session in the reply's own transaction, failure in the settled
    hook: either way one `processing` then one `active`, and the session is active."""
    headers = auth(make_token(tenant="tenant-a"))
    ok = await chat(client, headers, expect=200, message="hello", mode="wait")
    failed = await chat(client, headers, expect=200, message="hi", mode="wait", agent_id="nobody")
    assert ok["task"]["status"] == "succeeded"
    assert failed["task"]["status"] == "failed"
    for turn in (ok, failed):
        session_id = turn["task"]["session_id"]
        deadline = time.monotonic() + 5
        while len(states := await _session_states(client, "tenant-a", session_id)) < 2:
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # nothing more follows
        assert await _session_states(client, "tenant-a", session_id) == ["processing", "active"]
        session = await client.get(f"{SESSIONS}/{session_id}", headers=headers)
        assert session.json()["state"] == "active"
