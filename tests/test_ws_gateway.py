"""`/ws/v1` over real sockets: a uvicorn server with the options of `serve`, on loopback,
and `websockets` clients. Authentication, Origin, token expiry, chat over the socket,
tenant isolation, bad input. Limits are in test_ws_limits.py."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent_orchestrator.config import Settings
from tests.conftest import TokenFactory
from tests.ws_helpers import (
    ServerThread,
    answer_to,
    close_code,
    connections_settled,
    is_terminal,
    open_authed,
    recv,
    recv_until,
    send,
    wait_for,
)

SettingsFactory = Callable[..., Settings]


async def test_auth_by_first_message_gets_hello_then_pong(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings()) as server:
        ws, hello = await open_authed(server.url, token(ttl=600))
        data = hello["data"]
        assert hello["tenant_id"] == "tenant-a"
        assert hello["id"] == ""
        assert data["protocol"] == "v1"
        assert data["user_id"] == "user-1"
        assert data["expires_at"] > time.time() + 500
        assert data["limits"]["max_message_bytes"] == 65536
        await send(ws, type="system.ping", request_id="p-1")
        pong = await recv(ws)
        assert (pong["type"], pong["data"]["request_id"]) == ("system.pong", "p-1")
        await ws.close()


async def test_auth_by_bearer_subprotocol_echoes_only_bearer(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings()) as server:
        jwt = token()
        async with connect(server.url, subprotocols=["bearer", jwt]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            hello = await recv(ws)
            assert hello["data"]["for"] == "auth"
            await send(ws, type="system.ping")
            assert (await recv(ws))["type"] == "system.pong"
        async with connect(server.url, subprotocols=["bearer", "not.a.jwt"]) as ws:  # type: ignore[list-item]
            error = await recv(ws)
            assert error["data"]["code"] == "unauthorized"
            assert await close_code(ws) == 1008


async def test_unauthenticated_sockets_are_closed_1008(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(ws_auth_timeout=1.0)) as server:
        silent = await connect(server.url)
        started = time.monotonic()
        assert await close_code(silent) == 1008
        # Not at once, but when the 1 s for authenticating ran out (the server's clock
        # started before the client's, so a slow handshake shortens what is seen here).
        assert 0.5 < time.monotonic() - started < 3.5

        bad_token = await connect(server.url)
        await send(bad_token, type="auth", token="junk")
        error = await recv(bad_token)
        assert (error["type"], error["data"]["code"]) == ("system.error", "unauthorized")
        assert await close_code(bad_token) == 1008

        skipping = await connect(server.url)
        await send(skipping, type="system.ping")
        assert (await recv(skipping))["data"]["code"] == "unauthorized"
        assert await close_code(skipping) == 1008

        expired = await connect(server.url)
        await send(expired, type="auth", token=token(ttl=-60))
        assert "expired" in (await recv(expired))["data"]["message"]
        assert await close_code(expired) == 1008
        assert connections_settled(await wait_for(server.counts, connections_settled, 5))


@pytest.mark.parametrize("allow_missing", [True, False])
async def test_origin_is_checked_before_accepting(
    make_settings: SettingsFactory, token: TokenFactory, allow_missing: bool
) -> None:
    settings = make_settings(
        allowed_origins="https://chat.example.com", ws_allow_missing_origin=allow_missing
    )
    with ServerThread(settings) as server:
        for origin in ("https://evil.example", "http://chat.example.com", "null"):
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.url, origin=origin)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403
            assert json.loads(refused.value.response.body)["error"]["code"] == "forbidden"
        ws, _ = await open_authed(server.url, token(), origin="https://Chat.example.com/")
        await ws.close()
        if allow_missing:
            ws, _ = await open_authed(server.url, token())
            await ws.close()
        else:
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.url)
            assert refused.value.response.status_code == 403
        assert (await server.counts())["connections"] == 0


async def test_token_expiry_closes_the_socket_unless_refreshed(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings()) as server:
        expiring, hello = await open_authed(server.url, token(ttl=2))
        refreshed, _ = await open_authed(server.url, token(ttl=2))
        await send(refreshed, type="auth", token=token(ttl=600), request_id="r")
        again = await recv(refreshed)
        assert again["data"]["refreshed"] is True
        assert again["data"]["request_id"] == "r"
        assert await close_code(expiring, timeout=4) == 1008
        assert time.time() - hello["data"]["expires_at"] < 1.5
        await send(refreshed, type="system.ping")
        assert (await recv(refreshed))["type"] == "system.pong"
        await send(refreshed, type="auth", token=token(tenant="tenant-b"))
        assert (await recv(refreshed))["data"]["code"] == "unauthorized"
        assert await close_code(refreshed) == 1008


async def test_a_refreshed_token_without_a_scope_ends_the_subscriptions_it_needed(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings()) as server:
        ws, _ = await open_authed(server.url, token())
        await send(ws, type="chat.send", message="hi", subscribe=False)
        session_id = (await recv(ws))["session_id"]
        await send(ws, type="subscribe", session_id=session_id, request_id="s")
        assert (await recv(ws))["data"]["for"] == "subscribe"

        # The same scopes again: the subscription stays.
        await send(ws, type="auth", token=token(), request_id="same")
        seen = await recv_until(ws, answer_to("same"))
        assert not [m for m in seen if m["type"] == "system.error"], seen
        assert (await server.counts())["subscriptions"] == 1

        narrower = token(scopes=["chat:write", "tasks:read"])
        await send(ws, type="auth", token=narrower, request_id="narrower")
        seen = await recv_until(ws, answer_to("narrower"))
        ended = [m for m in seen if m["type"] == "system.error"]
        assert len(ended) == 1, seen
        assert ended[0]["data"]["code"] == "forbidden"
        assert ended[0]["data"]["details"] == {"session_id": session_id, "scope": "sessions:read"}
        ack = seen[-1]
        assert (ack["data"]["for"], ack["data"]["refreshed"]) == ("auth", True)
        assert ack["data"]["scopes"] == ["chat:write", "tasks:read"]
        assert (await server.counts())["subscriptions"] == 0
        await send(ws, type="subscribe", session_id=session_id, request_id="again")
        refused = (await recv_until(ws, answer_to("again")))[-1]
        assert refused["data"]["code"] == "forbidden"
        await ws.close()


async def test_chat_send_streams_the_turn_on_the_same_socket(
    make_backend_settings: SettingsFactory, make_token: TokenFactory
) -> None:
    with ServerThread(make_backend_settings(echo_chunk_delay=0.005)) as server:
        ws, _ = await open_authed(server.url, make_token())
        await send(ws, type="chat.send", message="one two three four", request_id="c-1")
        ack = await recv(ws)
        assert (ack["type"], ack["data"]["for"], ack["data"]["request_id"]) == (
            "system.ack",
            "chat.send",
            "c-1",
        )
        assert ack["data"]["created"] is True
        assert ack["data"]["subscribed"] is True
        task_id, session_id = ack["task_id"], ack["session_id"]
        events = await recv_until(ws, is_terminal, timeout=20)
        assert {event["task_id"] for event in events} == {task_id}
        assert {event["session_id"] for event in events} == {session_id}
        cursors = [int(event["id"]) for event in events]
        assert cursors == sorted(set(cursors))
        kinds = [event["type"] for event in events]
        assert kinds[0] == "task.status"
        assert events[0]["data"]["status"] == "queued"
        chunks = [event["data"] for event in events if event["type"] == "chat.stream"]
        assert [chunk["index"] for chunk in chunks] == list(range(len(chunks)))
        completed = [event for event in events if event["type"] == "chat.completed"]
        assert len(completed) == 1
        assert completed[0]["data"]["content"] == "".join(chunk["chunk"] for chunk in chunks)
        assert "one two three four" in completed[0]["data"]["content"]
        assert events[-1]["data"]["status"] == "succeeded"
        # The automatic task subscription ends with the task.
        counts = await wait_for(server.counts, lambda c: c["subscriptions"] == 0, 5)
        assert counts["subscriptions"] == 0

        # Same idempotency key twice: one task, acknowledged twice.
        await send(ws, type="chat.send", message="again", idempotency_key="k-1", subscribe=False)
        first = await recv(ws)
        await send(ws, type="chat.send", message="again", idempotency_key="k-1", subscribe=False)
        second = await recv(ws)
        assert first["task_id"] == second["task_id"]
        assert (first["data"]["created"], second["data"]["created"]) == (True, False)
        await ws.close()


async def test_another_tenant_or_user_cannot_subscribe_or_cancel(
    make_backend_settings: SettingsFactory, make_token: TokenFactory
) -> None:
    with ServerThread(make_backend_settings(echo_chunk_delay=0.05)) as server:
        owner, _ = await open_authed(server.url, make_token())
        await send(owner, type="chat.send", message="a b c d e f g h", subscribe=False)
        ack = await recv(owner)
        session_id, task_id = ack["session_id"], ack["task_id"]
        intruders = [make_token(tenant="tenant-b"), make_token(tenant="tenant-a", user="user-2")]
        for token in intruders:
            ws, _ = await open_authed(server.url, token)
            probes = [
                {"type": "subscribe", "session_id": session_id},
                {"type": "subscribe", "task_id": task_id},
                {"type": "subscribe", "task_id": task_id, "after": "0"},
                {"type": "chat.cancel", "task_id": task_id},
                {"type": "subscribe", "session_id": str(uuid.uuid4())},
            ]
            for number, probe in enumerate(probes):
                await send(ws, **probe, request_id=f"x-{number}")
                answer = await recv(ws)
                assert answer["type"] == "system.error", (probe, answer)
                assert answer["data"]["code"] == "not_found", (probe, answer)
                assert answer["data"]["request_id"] == f"x-{number}"
            assert (await server.counts())["subscriptions"] == 0
            await ws.close()
        # The owner can.
        await send(owner, type="subscribe", task_id=task_id, request_id="mine")
        ack = await recv(owner)
        assert (ack["type"], ack["data"]["request_id"]) == ("system.ack", "mine")
        await recv_until(owner, is_terminal, timeout=20)
        await owner.close()


async def test_a_socket_follows_a_batch_to_its_final_progress(
    make_backend_settings: SettingsFactory, make_token: TokenFactory
) -> None:
    """`subscribe` with `batch_id`: the batch's log from its first event (as for a task),
    live `batch.progress` after it, and the subscription ends with the final one. It
    needs `batch:read`, and another user's batch is not found."""
    with ServerThread(make_backend_settings(echo_chunk_delay=0.02)) as server:
        owner = make_token()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            body = {"items": [{"message": f"item {i} a b c d"} for i in range(4)]}
            created = await http.post(
                "/api/v1/batch", json=body, headers={"Authorization": f"Bearer {owner}"}
            )
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        ws, _ = await open_authed(server.url, owner)
        await send(ws, type="subscribe", batch_id=batch_id, request_id="b-1")
        ack = await recv(ws)
        assert ack["type"] == "system.ack"
        assert ack["data"]["stream"] == "batch"
        assert ack["data"]["batch_id"] == batch_id

        def final(message: dict[str, object]) -> bool:
            data = message.get("data")
            return isinstance(data, dict) and data.get("status") == "completed"

        progress = await recv_until(ws, final, timeout=20)
        assert {message["type"] for message in progress} == {"batch.progress"}
        assert progress[0]["data"]["counts"]["queued"] == 4  # replayed from the first
        assert progress[-1]["data"]["counts"]["succeeded"] == 4
        await wait_for(server.counts, lambda c: c["subscriptions"] == 0, timeout=5)
        await ws.close()

        for token, code in (
            (make_token(user="user-2"), "not_found"),
            (make_token(tenant="tenant-b"), "not_found"),
            (make_token(scopes=["tasks:read", "sessions:read"]), "forbidden"),
        ):
            other, _ = await open_authed(server.url, token)
            await send(other, type="subscribe", batch_id=batch_id)
            answer = await recv(other)
            assert (answer["type"], answer["data"]["code"]) == ("system.error", code)
            await other.close()


BAD_MESSAGES: list[tuple[str | bytes, str, str | None]] = [
    ("{not json", "bad_request", None),
    ("[1, 2]", "bad_request", None),
    ('"auth"', "bad_request", None),
    ('{"token": "x"}', "validation_error", "type"),
    ('{"type": 7}', "validation_error", "type"),
    ('{"type": "chat.explode"}', "unknown_type", "type"),
    ('{"type": "chat.send"}', "validation_error", "message"),
    ('{"type": "chat.send", "message": ""}', "validation_error", "message"),
    ('{"type": "chat.send", "message": "hi", "mode": "loud"}', "validation_error", "mode"),
    ('{"type": "chat.send", "message": "hi", "surprise": 1}', "validation_error", "surprise"),
    ('{"type": "subscribe"}', "validation_error", None),
    (
        '{"type": "subscribe", "task_id": "'
        + str(uuid.UUID(int=1))
        + '", "batch_id": "'
        + str(uuid.UUID(int=2))
        + '"}',
        "validation_error",
        None,
    ),
    (
        '{"type": "chat.send", "message": "hi", "session_id": "nope"}',
        "validation_error",
        "session_id",
    ),
    ('{"type": "chat.send", "message": "a\\u0000b"}', "validation_error", "message"),
    ('{"type": "chat.send", "message": "\\ud800"}', "validation_error", None),
    ('{"type": "chat.send", "message": "hi", "metadata": {"x": NaN}}', "bad_request", None),
    (
        '{"type": "chat.send", "message": "hi", "metadata": ' + "[" * 40 + "]" * 40 + "}",
        "validation_error",
        "metadata" + "[0]" * 31,
    ),
    (
        '{"type": "chat.send", "message": "hi", "metadata": {"a": "x\\u0000"}}',
        "validation_error",
        "metadata.a",
    ),
    ('{"type": "chat.cancel", "task_id": 5}', "validation_error", "task_id"),
    ('{"type": "subscribe"}', "validation_error", "(message)"),
    (
        json.dumps(
            {"type": "subscribe", "task_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4())}
        ),
        "validation_error",
        "(message)",
    ),
    (
        json.dumps({"type": "subscribe", "task_id": str(uuid.uuid4()), "after": "-1"}),
        "validation_error",
        "after",
    ),
    ('{"type": "system.ping", "request_id": ""}', "validation_error", "request_id"),
    (b"\x00\x01binary", "bad_request", None),
]


async def test_bad_messages_get_a_system_error_naming_the_problem(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(ws_messages_per_second=1000)) as server:
        ws, _ = await open_authed(server.url, token())
        for raw, code, field in BAD_MESSAGES:
            await ws.send(raw)
            error = await recv(ws)
            assert error["type"] == "system.error", (raw, error)
            assert error["data"]["code"] == code, (raw, error)
            if field is not None:
                fields = [item["field"] for item in error["data"]["details"]]
                assert field in fields, (raw, error)
        await send(ws, type="chat.send", message="hi", request_id="id-7", bogus=True)
        assert (await recv(ws))["data"]["request_id"] == "id-7"
        await send(ws, type="system.ping")
        assert (await recv(ws))["type"] == "system.pong"
        await ws.close()


async def test_chat_cancel_stops_the_running_turn(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(echo_chunk_delay=0.1)) as server:
        ws, _ = await open_authed(server.url, token())
        await send(ws, type="chat.send", message="a b c d e f g h i j k l")
        task_id = (await recv(ws))["task_id"]
        await recv_until(ws, lambda m: m["type"] == "chat.stream")
        await send(ws, type="chat.cancel", task_id=task_id, request_id="stop")
        seen = await recv_until(ws, is_terminal, timeout=10)
        acks = [m for m in seen if m["type"] == "system.ack"]
        assert [(a["data"]["for"], a["data"]["request_id"]) for a in acks] == [
            ("chat.cancel", "stop")
        ]
        assert acks[0]["data"]["status"] in {"running", "cancelled"}
        assert seen[-1]["data"]["status"] == "cancelled"
        assert not [m for m in seen if m["type"] == "chat.completed"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            metrics = (await http.get("/metrics")).text
        assert "nooble_orchestrator_websocket_connections_active" in metrics
        assert "nooble_orchestrator_websocket_subscriptions_active" in metrics
        await ws.close()
