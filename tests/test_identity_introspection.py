"""Tokens this service did not sign, introspected by the Identity Service (the test double,
a real process, with its service token required): over HTTP and on a WebSocket, with the
answer remembered, our own tokens never sent there, and a failing Identity Service a 503
rather than a 401."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from agent_orchestrator.config import Settings
from agent_orchestrator.errors import Unauthorized
from agent_orchestrator.middleware.auth import Introspector
from agent_orchestrator.models.principal import Principal, PrincipalKind
from agent_orchestrator.state import build_verifier
from tests.conftest import TokenFactory, auth, token_factory
from tests.ws_helpers import ServerThread, answer_to, close_code, recv, recv_until, send

OPAQUE = "tok:acme:alice:sessions:read,chat:write"


@pytest.fixture
def server(make_settings: Callable[..., Settings], double_url: str) -> Iterator[ServerThread]:
    settings = make_settings(identity_service_url=double_url)
    with ServerThread(settings) as running:
        yield running


def http_url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.port}"


async def introspections(double_url: str) -> int:
    async with httpx.AsyncClient(base_url=double_url) as control:
        found = await control.get("/_control/requests", params={"service": "identity"})
        return int(found.json()["count"])


async def fault(double_url: str, **spec: object) -> None:
    async with httpx.AsyncClient(base_url=double_url) as control:
        if spec:
            response = await control.post("/_control/faults", json={"service": "identity", **spec})
        else:
            response = await control.delete("/_control/faults")
        assert response.status_code == 200, response.text


@pytest.fixture(autouse=True)
async def clean_double(double_url: str) -> None:
    await fault(double_url)
    async with httpx.AsyncClient(base_url=double_url) as control:
        await control.delete("/_control/requests")


async def test_an_introspected_token_is_a_principal_with_its_scopes(
    server: ServerThread, double_url: str
) -> None:
    async with httpx.AsyncClient(base_url=http_url(server)) as http:
        for _ in range(3):
            listed = await http.get("/api/v1/sessions", headers=auth(OPAQUE))
            assert listed.status_code == 200, listed.text
        created = await http.post("/api/v1/sessions", json={}, headers=auth(OPAQUE))
        assert created.status_code == 403, created.text  # no sessions:write in its scopes
        assert created.json()["error"]["details"] == {"scope": "sessions:write"}
        turn = await http.post(
            "/api/v1/chat", json={"message": "hi", "mode": "wait"}, headers=auth(OPAQUE)
        )
        assert turn.status_code == 200, turn.text
        session = turn.json()["task"]["session_id"]
        # The session belongs to the tenant and user the Identity Service named.
        other = auth("tok:other-tenant:alice:sessions:read")
        assert (await http.get(f"/api/v1/sessions/{session}", headers=other)).status_code == 404
        assert (await http.get(f"/api/v1/sessions/{session}", headers=auth(OPAQUE))).json()[
            "user_id"
        ] == "alice"
    # Remembered: one question per token, however many requests.
    assert await introspections(double_url) == 2


async def test_inactive_tokens_are_401_and_our_own_tokens_are_never_sent(
    server: ServerThread, double_url: str, make_settings: Callable[..., Settings]
) -> None:
    ours: TokenFactory = token_factory(build_verifier(make_settings()))
    async with httpx.AsyncClient(base_url=http_url(server)) as http:
        inactive = await http.get("/api/v1/sessions", headers=auth("revoked-or-unknown"))
        assert inactive.status_code == 401
        assert inactive.json()["error"]["message"] == "token is not active"
        assert (await introspections(double_url)) == 1
        assert (await http.get("/api/v1/sessions", headers=auth(ours()))).status_code == 200
        expired = await http.get("/api/v1/sessions", headers=auth(ours(ttl=-120)))
        assert expired.status_code == 401
        assert expired.json()["error"]["message"] == "token has expired"
    assert await introspections(double_url) == 1  # neither of ours was asked about


async def test_a_failing_identity_service_is_503_and_nothing_is_remembered(
    server: ServerThread, double_url: str
) -> None:
    token = "tok:acme:bob:sessions:read"
    async with httpx.AsyncClient(base_url=http_url(server)) as http:
        await fault(double_url, status=500)
        failed = await http.get("/api/v1/sessions", headers=auth(token))
        assert failed.status_code == 503, failed.text
        error = failed.json()["error"]
        assert error["code"] == "service_unavailable"
        assert error["details"]["service"] == "identity"
        await fault(double_url)
        assert (await http.get("/api/v1/sessions", headers=auth(token))).status_code == 200


async def test_websocket_auth_introspects_too(server: ServerThread, double_url: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(server.url) as ws:
        await send(ws, type="auth", token=OPAQUE, request_id="a1")
        hello = await recv(ws)
        assert (hello["type"], hello["data"]["for"]) == ("system.ack", "auth"), hello
        assert hello["tenant_id"] == "acme"
        assert hello["data"]["user_id"] == "alice"
    async with connect(server.url) as ws:
        await send(ws, type="auth", token="nobody")
        refused = await recv(ws)
        assert refused["data"]["code"] == "unauthorized"
        assert await close_code(ws) == 1008
    await fault(double_url, status=503)
    async with connect(server.url) as ws:
        await send(ws, type="auth", token="tok:acme:carol")
        unavailable = await recv(ws)
        assert unavailable["data"]["code"] == "service_unavailable"
        assert unavailable["data"]["retryable"] is True
        assert await close_code(ws) == 1013


async def test_the_cache_keeps_an_answer_for_its_time_and_never_past_exp() -> None:
    now = [1_000.0]
    answers: list[dict[str, object]] = []

    class Identity:
        async def introspect(self, ctx: object, *, token: str) -> object:
            from agent_orchestrator.clients.identity import TokenInfo

            answers.append({"token": token})
            if token == "soon":
                return TokenInfo(active=True, sub="u", tenant_id="t", exp=1_010)
            return TokenInfo(active=token == "good", sub="u", tenant_id="t", exp=None)

    introspector = Introspector(30, clock=lambda: now[0])
    introspector.client = Identity()  # type: ignore[assignment]
    expected = Principal("t", "u", frozenset(), kind=PrincipalKind.USER)
    assert await introspector.principal("good") == expected
    with pytest.raises(Unauthorized):
        await introspector.principal("bad")
    assert (await introspector.principal("soon")).expires_at == 1_010
    now[0] += 20
    await introspector.principal("good")
    with pytest.raises(Unauthorized):
        await introspector.principal("bad")  # an inactive answer is remembered too
    assert len(answers) == 3
    with pytest.raises(Unauthorized):
        await introspector.principal("soon")  # past its exp: asked again, and now inactive
    assert len(answers) == 4
    now[0] += 20  # past the cache's 30 s
    await introspector.principal("good")
    assert len(answers) == 5


async def test_one_address_cannot_make_it_ask_more_than_its_rate(
    make_settings: Callable[..., Settings], double_url: str
) -> None:
    settings = make_settings(identity_service_url=double_url, ip_rate_limit=3)
    with ServerThread(settings) as running:
        async with httpx.AsyncClient(base_url=http_url(running)) as http:
            statuses = [
                (await http.get("/api/v1/sessions", headers=auth(f"random-{index}"))).status_code
                for index in range(8)
            ]
    assert statuses[:3] == [401, 401, 401]
    assert set(statuses[3:]) == {429}
    # Random tokens from one address: three questions, then none (not one per request).
    assert await introspections(double_url) == 3


async def test_a_revoked_token_closes_its_open_socket(
    make_settings: Callable[..., Settings], double_url: str
) -> None:
    from websockets.asyncio.client import connect

    settings = make_settings(identity_service_url=double_url, identity_cache_seconds=1)
    token = "tok:acme:dave:sessions:read"
    with ServerThread(settings) as running:
        async with connect(running.url) as kept, connect(running.url) as revoked:
            for ws, which in ((kept, OPAQUE), (revoked, token)):
                await send(ws, type="auth", token=which)
                assert (await recv(ws))["data"]["for"] == "auth"
            # While the Identity Service cannot answer, the sockets stay open.
            await fault(double_url, status=503)
            asked = await introspections(double_url)
            await asyncio.sleep(2.5)
            assert await introspections(double_url) > asked  # rounds were made, and failed
            for ws in (kept, revoked):
                await send(ws, type="system.ping", request_id="outage")
                assert (await recv(ws))["type"] == "system.pong"
            await fault(double_url)
            async with httpx.AsyncClient(base_url=double_url) as control:
                answer = await control.post("/_control/revoked", json={"token": token})
                assert answer.status_code == 200
            started = time.monotonic()
            assert await close_code(revoked, timeout=5) == 1008
            assert time.monotonic() - started < 3  # within about IDENTITY_CACHE_SECONDS
            # The other socket's token is still active: it stays open and answers.
            await send(kept, type="system.ping", request_id="still")
            pong = await recv(kept)
            assert (pong["type"], pong["data"]["request_id"]) == ("system.pong", "still")


async def test_scopes_taken_away_end_the_subscriptions_that_needed_them(
    make_settings: Callable[..., Settings], double_url: str
) -> None:
    from websockets.asyncio.client import connect

    settings = make_settings(identity_service_url=double_url, identity_cache_seconds=1)
    token = "tok:acme:erin:sessions:read,chat:write"
    with ServerThread(settings) as running:
        async with connect(running.url) as ws:
            await send(ws, type="auth", token=token)
            assert (await recv(ws))["data"]["for"] == "auth"
            await send(ws, type="chat.send", message="hi", subscribe=False)
            session_id = (await recv(ws))["session_id"]
            await send(ws, type="subscribe", session_id=session_id, request_id="s")
            assert (await recv_until(ws, answer_to("s")))[-1]["data"]["for"] == "subscribe"

            async with httpx.AsyncClient(base_url=double_url) as control:
                answer = await control.post(
                    "/_control/scopes", json={"token": token, "scopes": ["chat:write"]}
                )
                assert answer.status_code == 200, answer.text
            # Asked again once the answer is IDENTITY_CACHE_SECONDS old: the socket is
            # still open (the token is active), the subscription is over.
            ended = (await recv_until(ws, lambda m: m["type"] == "system.error", timeout=5))[-1]
            assert ended["data"]["code"] == "forbidden"
            assert ended["data"]["details"] == {
                "session_id": session_id,
                "scope": "sessions:read",
            }
            await send(ws, type="subscribe", session_id=session_id, request_id="again")
            refused = (await recv_until(ws, answer_to("again")))[-1]
            assert refused["data"]["code"] == "forbidden"
            await send(ws, type="system.ping", request_id="open")
            assert (await recv_until(ws, answer_to("open")))[-1]["type"] == "system.pong"
