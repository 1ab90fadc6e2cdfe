"""`/ws/v1` over real sockets: a uvicorn server with the options of `serve`, on loopback,
and `websockets` clients. Authentication, Origin, token expiry, chat over the socket,
tenant isolation, bad input, message size, floods, caps and teardown."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.uri import parse_uri

from agent_orchestrator.config import Settings
from agent_orchestrator.events.models import Event
from agent_orchestrator.models.principal import USER_SCOPES
from agent_orchestrator.state import build_verifier
from tests.conftest import TokenFactory, auth
from tests.ws_helpers import (
    ServerThread,
    close_code,
    is_terminal,
    open_authed,
    recv,
    recv_until,
    send,
    wait_for,
)

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def token(make_settings: SettingsFactory) -> TokenFactory:
    """Tokens for the embedded-only tests (`make_token` would run them on both backends)."""
    verifier = build_verifier(make_settings())

    def factory(
        tenant: str = "tenant-a",
        user: str = "user-1",
        ttl: int = 600,
        scopes: list[str] | None = None,
    ) -> str:
        return verifier.issue(
            tenant_id=tenant,
            user_id=user,
            scopes=list(USER_SCOPES) if scopes is None else scopes,
            ttl_seconds=ttl,
            now=time.time(),
        )

    return factory


def _settled(counts: dict[str, int]) -> bool:
    return counts["connections"] == 0 and counts["subscriptions"] == 0


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
    with ServerThread(make_settings(ws_auth_timeout=0.4)) as server:
        silent = await connect(server.url)
        started = time.monotonic()
        assert await close_code(silent) == 1008
        assert 0.3 < time.monotonic() - started < 3

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
        assert _settled(await wait_for(server.counts, _settled, 5))


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
    (
        '{"type": "chat.send", "message": "hi", "session_id": "nope"}',
        "validation_error",
        "session_id",
    ),
    ('{"type": "chat.send", "message": "a\\u0000b"}', "validation_error", None),
    ('{"type": "chat.send", "message": "\\ud800"}', "validation_error", None),
    ('{"type": "chat.send", "message": "hi", "metadata": {"x": NaN}}', "bad_request", None),
    (
        '{"type": "chat.send", "message": "hi", "metadata": ' + "[" * 40 + "]" * 40 + "}",
        "validation_error",
        None,
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


async def test_oversized_message_closes_1009_and_others_go_on(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(ws_max_frame_bytes=4096)) as server:
        big, _ = await open_authed(server.url, token())
        other, _ = await open_authed(server.url, token())
        await send(big, type="chat.send", message="x" * 3000)  # under the cap: a normal turn
        assert (await recv(big))["data"]["for"] == "chat.send"
        await send(big, type="chat.send", message="x" * 5000)
        assert await close_code(big) == 1009
        await send(other, type="system.ping")
        assert (await recv(other))["type"] == "system.pong"
        await other.close()


async def test_a_flood_is_rate_limited_then_closed_1008(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(ws_messages_per_second=5)) as server:
        flooder, _ = await open_authed(server.url, token())
        calm, _ = await open_authed(server.url, token())
        for number in range(60):
            await send(flooder, type="system.ping", request_id=str(number))
        kinds: list[str] = []
        code = None
        try:
            while True:
                message = await recv(flooder)
                kinds.append(message["data"].get("code") or message["type"])
        except Exception:
            code = flooder.close_code
        assert 9 <= kinds.count("system.pong") <= 12  # the burst (twice the rate) less auth
        assert "rate_limited" in kinds
        assert code == 1008
        await send(calm, type="system.ping")
        assert (await recv(calm))["type"] == "system.pong"
        await calm.close()


async def test_per_ip_cap_holds_under_a_flood_and_earlier_sockets_work(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(ws_max_connections_per_ip=5)) as server:
        jwt = token()
        first = [(await open_authed(server.url, jwt))[0] for _ in range(5)]
        extra = await asyncio.gather(*(connect(server.url) for _ in range(20)))
        codes = await asyncio.gather(*(close_code(ws) for ws in extra))
        assert codes == [1013] * 20
        assert extra[0].close_reason.startswith("too many connections from this address")
        for ws in first:
            await send(ws, type="system.ping")
            assert (await recv(ws))["type"] == "system.pong"
        assert (await server.counts())["connections"] == 5
        for ws in first:
            await ws.close()
        assert _settled(await wait_for(server.counts, _settled, 5))


async def test_tenant_and_instance_caps_close_1013(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    settings = make_settings(websocket_max_connections=3, ws_max_connections_per_tenant=2)
    with ServerThread(settings) as server:
        a1, _ = await open_authed(server.url, token())
        a2, _ = await open_authed(server.url, token())
        a3 = await connect(server.url)
        await send(a3, type="auth", token=token())
        assert await close_code(a3) == 1013  # third of tenant-a
        await wait_for(server.counts, lambda c: c["connections"] == 2, 5)
        b1, _ = await open_authed(server.url, token(tenant="tenant-b"))
        over = await connect(server.url)
        assert await close_code(over) == 1013  # fourth of the instance
        for ws in (a1, a2, b1):
            await ws.close()


async def test_abrupt_disconnects_leave_no_subscription_or_task_behind(
    make_backend_settings: SettingsFactory, make_token: TokenFactory
) -> None:
    with ServerThread(make_backend_settings()) as server:
        token = make_token()
        seed, _ = await open_authed(server.url, token)
        await send(seed, type="chat.send", message="seed")
        session_id = (await recv(seed))["session_id"]
        await recv_until(seed, is_terminal, timeout=20)
        await seed.close()
        baseline = await wait_for(server.counts, _settled, 5)
        for round_number in range(3):
            sockets = [(await open_authed(server.url, token))[0] for _ in range(12)]
            for ws in sockets:
                await send(ws, type="subscribe", session_id=session_id)
                assert (await recv(ws))["data"]["for"] == "subscribe"
            busy = await server.counts()
            assert busy["connections"] == 12
            assert busy["subscriptions"] == 12
            assert busy["bus_subscribers"] == 1  # one per stream per instance, not per socket
            for number, ws in enumerate(sockets):
                if number % 3 == 0:  # RST, no close frame
                    sock = ws.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    ws.transport.abort()
                elif number % 3 == 1:
                    ws.transport.close()  # FIN, no close frame
                else:
                    await ws.close()
            after = await wait_for(
                server.counts,
                lambda c: (
                    _settled(c) and c["bus_subscribers"] == 0 and c["tasks"] <= baseline["tasks"]
                ),
                5,
            )
            assert after["connections"] == 0, round_number
            assert after["subscriptions"] == 0
            assert after["bus_subscribers"] == 0
            assert after["tasks"] <= baseline["tasks"], (baseline, after)


async def _create_session(server: ServerThread, jwt: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        response = await http.post("/api/v1/sessions", json={}, headers=auth(jwt))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


async def test_a_client_that_stops_reading_is_closed_and_others_keep_their_latency(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    """The fan-out never waits for a socket: a client that stops reading fills its own
    outbox and is cut off, while a healthy client's publish-to-receive latency stays
    near what it was before (a ratio against the same run's baseline)."""
    with ServerThread(make_settings(ws_send_queue=32, ws_messages_per_second=1000)) as server:
        jwt = token()
        probe_session, flood_session = [await _create_session(server, jwt) for _ in range(2)]
        bus = server.app.state.core.bus
        healthy, _ = await open_authed(server.url, jwt)
        await send(healthy, type="subscribe", session_id=probe_session)
        assert (await recv(healthy))["data"]["for"] == "subscribe"
        latencies: dict[int, float] = {}

        async def read_probes() -> None:
            while True:
                event = json.loads(await healthy.recv())
                latencies[event["data"]["n"]] = time.time() - event["data"]["sent"]

        async def probe(number: int) -> None:
            event = Event(
                type="test.probe",
                tenant_id="tenant-a",
                session_id=probe_session,
                data={"n": number, "sent": time.time()},
            )
            await server.call(bus.publish(event))

        async def flood(count: int) -> None:
            filler = "x" * 4096
            for _ in range(count):
                await bus.publish(
                    Event(
                        type="test.flood",
                        tenant_id="tenant-a",
                        session_id=flood_session,
                        data={"filler": filler},
                    )
                )

        reader = asyncio.create_task(read_probes())
        for number in range(40):  # baseline: nobody stalls
            await probe(number)
            await asyncio.sleep(0.01)

        # A client with a tiny receive buffer that subscribes, then never reads again.
        raw = socket.create_connection(("127.0.0.1", server.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        closed_1008 = _closed_by_server(1008)
        stalled, _ = await open_authed(server.url, jwt, sock=raw, max_queue=1)
        await send(stalled, type="subscribe", session_id=flood_session)
        assert (await recv(stalled))["data"]["for"] == "subscribe"
        for number in range(40, 100):  # during: floods to the stalled client
            await server.call(flood(60))
            await probe(number)
            await asyncio.sleep(0.01)
        counts = await wait_for(server.counts, lambda c: c["connections"] == 1, 5)
        assert counts["connections"] == 1, "the stalled client was not closed"
        assert counts["subscriptions"] == 1
        assert _closed_by_server(1008) == closed_1008 + 1  # by its outbox overflowing
        await wait_for(_async(lambda: len(latencies) == 100), bool, 5)
        reader.cancel()
        assert sorted(latencies) == list(range(100))
        before = sorted(latencies[n] for n in range(40))
        during = sorted(latencies[n] for n in range(40, 100))
        p95_before, p95_during = before[int(0.95 * 40)], during[int(0.95 * 60)]
        print(f"healthy p95: before {p95_before * 1000:.1f} ms, during {p95_during * 1000:.1f} ms")
        assert p95_during <= 5 * p95_before + 0.05
        stalled.transport.abort()
        await healthy.close()


def _async(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return predicate()

    return probe


def _closed_by_server(code: int) -> float:
    name = "nooble_orchestrator_websocket_closed_by_server_total"
    return REGISTRY.get_sample_value(name, {"code": str(code)}) or 0.0


async def test_subscribe_after_replays_the_log_at_the_clients_pace_then_goes_live(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    """A replay larger than the send queue waits for the client instead of overflowing;
    `after` resumes exactly after that id; live events then reach every follower once."""
    with ServerThread(make_settings(ws_send_queue=8)) as server:
        jwt = token()
        session_id = await _create_session(server, jwt)
        bus = server.app.state.core.bus

        async def publish(numbers: range) -> list[str]:
            ids = []
            for number in numbers:
                event = Event(type="test.note", tenant_id="tenant-a", session_id=session_id,
                              data={"n": number})  # fmt: skip
                ids.append((await bus.publish(event)).id)
            return ids

        ids = await server.call(publish(range(100)))
        whole, resumed, live = [(await open_authed(server.url, jwt))[0] for _ in range(3)]
        await send(whole, type="subscribe", session_id=session_id, after="0")
        await send(resumed, type="subscribe", session_id=session_id, after=ids[59])
        await send(live, type="subscribe", session_id=session_id)
        for ws in (whole, resumed, live):
            assert (await recv(ws))["data"]["for"] == "subscribe"

        async def numbers(ws: ClientConnection, count: int) -> list[int]:
            return [(await recv(ws))["data"]["n"] for _ in range(count)]

        assert await numbers(whole, 100) == list(range(100))
        assert await numbers(resumed, 40) == list(range(60, 100))
        await server.call(publish(range(100, 105)))
        for ws in (whole, resumed, live):
            assert await numbers(ws, 5) == list(range(100, 105))
            await send(ws, type="system.ping")
            assert (await recv(ws))["type"] == "system.pong"  # nothing else was queued
        assert (await server.counts())["bus_subscribers"] == 1
        for ws in (whole, resumed, live):
            await ws.close()


async def test_idle_sockets_close_1000_and_dead_peers_are_dropped_by_ping_timeout(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    settings = make_settings(ws_idle_timeout=0.6, ws_ping_interval=0.2, ws_ping_timeout=0.3)
    with ServerThread(settings) as server:
        idle, _ = await open_authed(server.url, token())
        started = time.monotonic()
        assert await close_code(idle, timeout=5) == 1000
        assert idle.close_reason == "idle timeout"
        assert 0.5 < time.monotonic() - started < 2.5

        # A peer that authenticates, then never reads again: it answers no ping.
        dead = ClientProtocol(parse_uri(server.url))
        raw = socket.create_connection(("127.0.0.1", server.port))
        dead.send_request(dead.connect())
        raw.sendall(b"".join(dead.data_to_send()))
        dead.receive_data(raw.recv(65536))
        assert dead.handshake_exc is None
        dead.send_text(json.dumps({"type": "auth", "token": token()}).encode())
        raw.sendall(b"".join(dead.data_to_send()))
        assert (await wait_for(server.counts, lambda c: c["connections"] == 1, 2))["connections"]
        gone = await wait_for(server.counts, lambda c: c["connections"] == 0, 3)
        assert gone["connections"] == 0  # within ping interval + ping timeout
        raw.close()


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
