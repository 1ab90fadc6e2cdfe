"""`/ws/v1` limits over real sockets (a uvicorn server with the options of `serve`, on
loopback, and `websockets` clients): message size, floods, caps, teardown after abrupt
disconnects, slow consumers, replay at the client's pace, idle and dead peers."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from agent_orchestrator.config import Settings
from agent_orchestrator.events.models import Event
from tests.conftest import TokenFactory, auth
from tests.ws_helpers import (
    ServerThread,
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
        assert connections_settled(await wait_for(server.counts, connections_settled, 5))


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
        baseline = await wait_for(server.counts, connections_settled, 5)
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
                    connections_settled(c)
                    and c["bus_subscribers"] == 0
                    and c["tasks"] <= baseline["tasks"]
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
    settings = make_settings(ws_idle_timeout=1.2, ws_ping_interval=0.2, ws_ping_timeout=0.3)
    with ServerThread(settings) as server:
        idle, _ = await open_authed(server.url, token())
        started = time.monotonic()
        assert await close_code(idle, timeout=5) == 1000
        assert idle.close_reason == "idle timeout"
        # When the idle time ran out, not before (pings answered do not count as activity).
        assert 0.6 < time.monotonic() - started < 3.5

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


async def test_subscriptions_per_socket_are_capped(
    make_settings: SettingsFactory, token: TokenFactory
) -> None:
    with ServerThread(make_settings(ws_max_subscriptions=2)) as server:
        jwt = token()
        sessions = [await _create_session(server, jwt) for _ in range(3)]
        ws, _ = await open_authed(server.url, jwt)
        for number, session_id in enumerate(sessions):
            await send(ws, type="subscribe", session_id=session_id, request_id=str(number))
        answers = [await recv(ws) for _ in sessions]
        assert [a["type"] for a in answers] == ["system.ack", "system.ack", "system.error"]
        assert answers[2]["data"]["code"] == "too_many_subscriptions"
        await send(ws, type="subscribe", session_id=sessions[0], after="0")  # a replacement
        assert (await recv(ws))["type"] == "system.ack"
        assert (await server.counts())["subscriptions"] == 2
        await ws.close()
