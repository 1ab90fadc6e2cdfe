"""Bearer-token authentication, scopes and the service token of `/internal/*`.

Token checks do not touch the database, so these run on the embedded backend only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest

from agent_orchestrator.config import Settings
from agent_orchestrator.errors import Unauthorized
from agent_orchestrator.middleware.auth import TokenVerifier
from tests.conftest import TokenFactory, auth, running_app


@pytest.fixture
def backend() -> str:
    return "sqlite"


SESSIONS = "/api/v1/sessions"
OTHER_KEY = "another-key-that-is-long-enough-for-hs256-0123456789"


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "user-1",
        "tenant_id": "tenant-a",
        "scopes": "sessions:read sessions:write",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_by_hand(claims: dict[str, Any], key: bytes, header: dict[str, Any]) -> str:
    """PyJWT refuses to sign with an empty key; an attacker would not."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details", "correlation_id"}
    assert body["error"]["code"] == code
    assert body["error"]["correlation_id"] == response.headers["x-correlation-id"]


def _bad_tokens(secret: str) -> dict[str, str]:
    valid = jwt.encode(_claims(), secret, algorithm="HS256")
    header, payload, signature = valid.split(".")
    tampered_payload = _b64(json.dumps(_claims(tenant_id="tenant-b")).encode())
    return {
        "forged random string": secrets.token_urlsafe(48),
        "three random segments": ".".join(secrets.token_urlsafe(16) for _ in range(3)),
        "non-JWT junk": "not a token at all",
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "no signature": f"{header}.{payload}.",
        "expired": jwt.encode(_claims(exp=int(time.time()) - 120), secret, algorithm="HS256"),
        "without exp": jwt.encode(_claims(exp=None), secret, algorithm="HS256"),
        "without sub": jwt.encode(_claims(sub=None), secret, algorithm="HS256"),
        "nbf in the future": jwt.encode(
            _claims(nbf=int(time.time()) + 600), secret, algorithm="HS256"
        ),
        "signed with another key": jwt.encode(_claims(), OTHER_KEY, algorithm="HS256"),
        "alg none": jwt.encode(_claims(), None, algorithm="none"),
        "alg NONE, unsigned": _unsigned(_claims(), {"alg": "NONE", "typ": "JWT"}),
        "alg HS256, unsigned": _unsigned(_claims(), {"alg": "HS256", "typ": "JWT"}),
        "HS512 (algorithm not pinned)": jwt.encode(_claims(), secret, algorithm="HS512"),
        "kid path traversal, another key": jwt.encode(
            _claims(), OTHER_KEY, algorithm="HS256", headers={"kid": "../../dev/null"}
        ),
        "kid path traversal, empty key": _hs256_by_hand(
            _claims(), b"", {"alg": "HS256", "typ": "JWT", "kid": "../../dev/null"}
        ),
        "jku URL, another key": jwt.encode(
            _claims(),
            OTHER_KEY,
            algorithm="HS256",
            headers={"jku": "https://attacker.example/jwks.json", "kid": "k1"},
        ),
        "missing tenant_id": jwt.encode(_claims(tenant_id=None), secret, algorithm="HS256"),
        "empty tenant_id": jwt.encode(_claims(tenant_id=""), secret, algorithm="HS256"),
        "tenant_id a number": jwt.encode(_claims(tenant_id=7), secret, algorithm="HS256"),
        # Signed, but not text a database can store (the session's row would take it).
        "tenant_id with NUL": jwt.encode(_claims(tenant_id="a\x00b"), secret, algorithm="HS256"),
        "sub a lone surrogate": _hs256_by_hand(
            {**_claims(), "sub": "\ud800"}, secret.encode(), {"alg": "HS256", "typ": "JWT"}
        ),
        "scopes a number": jwt.encode(_claims(scopes=5), secret, algorithm="HS256"),
        "scopes a list of numbers": jwt.encode(_claims(scopes=[1, 2]), secret, algorithm="HS256"),
        "scopes an object": jwt.encode(
            _claims(scopes={"sessions:read": True}), secret, algorithm="HS256"
        ),
    }


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_bad_tokens_are_401_never_500(
    client: httpx.AsyncClient, settings: Settings, make_token: TokenFactory
) -> None:
    secret = settings.resolved_secret_key()
    assert (await client.get(SESSIONS, headers=auth(make_token()))).status_code == 200
    for name, token in _bad_tokens(secret).items():
        for method, url in (("GET", SESSIONS), ("POST", SESSIONS)):
            response = await client.request(method, url, json={}, headers=auth(token))
            assert response.status_code == 401, (name, method, response.text)
            _assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"


async def test_malformed_authorization_headers_are_401(client: httpx.AsyncClient) -> None:
    headers: list[bytes | str] = [
        "Bearer",
        "Bearer    ",
        "Basic dXNlcjpwYXNz",
        "Basic x",
        "Token abc.def.ghi",
        "abc.def.ghi",
        b"Bearer \xff\xfe\xfd",
    ]
    for value in headers:
        response = await client.get(SESSIONS, headers={"Authorization": value})
        _assert_error(response, 401, "unauthorized")
    _assert_error(await client.get(SESSIONS), 401, "unauthorized")


async def test_issuer_and_audience_when_configured(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(jwt_issuer="https://issuer.test", jwt_audience="orchestrator")
    secret = settings.resolved_secret_key()
    iss, aud = "https://issuer.test", "orchestrator"

    def token(**claims: Any) -> str:
        return jwt.encode(_claims(**claims), secret, algorithm="HS256")

    refused = {
        "no iss": token(aud=aud),
        "wrong iss": token(iss="https://evil.test", aud=aud),
        "no aud": token(iss=iss),
        "wrong aud": token(iss=iss, aud="someone-else"),
        "wrong aud list": token(iss=iss, aud=["a", "b"]),
    }
    accepted = {
        "right iss and aud": token(iss=iss, aud=aud),
        "aud list holding ours": token(iss=iss, aud=["other", aud]),
    }
    async with running_app(settings) as client:
        for name, value in refused.items():
            response = await client.get(SESSIONS, headers=auth(value))
            assert response.status_code == 401, name
            _assert_error(response, 401, "unauthorized")
        for name, value in accepted.items():
            response = await client.get(SESSIONS, headers=auth(value))
            assert response.status_code == 200, (name, response.text)


async def test_scopes_as_string_list_or_permissions(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    secret = settings.resolved_secret_key()
    forms = {
        "space-separated string": _claims(scopes="sessions:write sessions:read"),
        "list": _claims(scopes=["sessions:read", "sessions:write"]),
        "permissions claim": _claims(scopes=None, permissions=["sessions:read", "sessions:write"]),
    }
    for name, claims in forms.items():
        headers = auth(jwt.encode(claims, secret, algorithm="HS256"))
        created = await client.post(SESSIONS, json={}, headers=headers)
        assert created.status_code == 201, (name, created.text)
        listed = await client.get(SESSIONS, headers=headers)
        assert listed.status_code == 200, name


async def test_missing_scope_is_403(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    writer = auth(make_token(scopes=["sessions:write"]))
    session_id = (await client.post(SESSIONS, json={}, headers=writer)).json()["id"]

    reader = auth(make_token(scopes=["sessions:read"]))
    assert (await client.get(SESSIONS, headers=reader)).status_code == 200
    for method, url in (
        ("POST", SESSIONS),
        ("PATCH", f"{SESSIONS}/{session_id}"),
        ("DELETE", f"{SESSIONS}/{session_id}"),
    ):
        response = await client.request(method, url, json={}, headers=reader)
        _assert_error(response, 403, "forbidden")
        assert response.json()["error"]["details"] == {"scope": "sessions:write"}

    for url in (SESSIONS, f"{SESSIONS}/{session_id}", f"{SESSIONS}/{session_id}/messages"):
        _assert_error(await client.get(url, headers=writer), 403, "forbidden")

    nothing = auth(make_token(scopes=[]))
    _assert_error(await client.get(SESSIONS, headers=nothing), 403, "forbidden")
    _assert_error(await client.post(SESSIONS, json={}, headers=nothing), 403, "forbidden")

    admin = auth(make_token(scopes=["admin"]))
    assert (await client.post(SESSIONS, json={}, headers=admin)).status_code == 201


async def test_internal_routes_take_only_the_service_token(
    client: httpx.AsyncClient, settings: Settings, make_token: TokenFactory
) -> None:
    url = "/internal/v1/ping"
    assert settings.service_token is not None
    service_token = settings.service_token.get_secret_value()

    ok = await client.get(url, headers={**auth(service_token), "X-Tenant-ID": "tenant-a"})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"status": "ok", "tenant_id": "tenant-a"}

    admin_jwt = make_token(scopes=["admin"])
    for name, headers in {
        "no header": {},
        "user JWT": auth(make_token()),
        "admin JWT": auth(admin_jwt),
        "wrong token": auth("not-the-service-token"),
        "prefix of the token": auth(service_token[:-1]),
        "token plus suffix": auth(service_token + "x"),
        "service token as Basic": {"Authorization": f"Basic {service_token}"},
    }.items():
        response = await client.get(url, headers=headers)
        assert response.status_code == 401, name
        _assert_error(response, 401, "unauthorized")


async def test_internal_routes_closed_without_a_configured_service_token(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(service_token=None)) as client:
        for headers in ({}, auth(""), auth("None"), auth("test-service-token")):
            response = await client.get("/internal/v1/ping", headers=headers)
            _assert_error(response, 401, "unauthorized")


class _Clock:
    """A settable clock for the verifier's cache; PyJWT's first decode uses the real one."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _verifier(clock: _Clock, **options: Any) -> TokenVerifier:
    return TokenVerifier(OTHER_KEY, leeway_seconds=30, clock=clock, **options)


def test_a_cached_token_returns_the_same_principal() -> None:
    verifier = _verifier(_Clock())
    token = jwt.encode(_claims(), OTHER_KEY, algorithm="HS256")
    first = verifier.verify(token)
    assert verifier.verify(token) is first
    assert first.tenant_id == "tenant-a"
    assert first.scopes == frozenset({"sessions:read", "sessions:write"})


def test_a_cached_token_is_refused_once_it_expires() -> None:
    clock = _Clock()
    verifier = _verifier(clock)
    exp = int(clock.now) + 60
    token = jwt.encode(_claims(exp=exp), OTHER_KEY, algorithm="HS256")
    verifier.verify(token)

    clock.now = exp + 29.9  # still inside the 30 s leeway
    assert verifier.verify(token).user_id == "user-1"
    clock.now = exp + 30  # PyJWT's rule: expired once exp <= now - leeway
    with pytest.raises(Unauthorized, match="token has expired"):
        verifier.verify(token)


def test_refused_tokens_are_refused_every_time() -> None:
    verifier = _verifier(_Clock())
    for token in (
        jwt.encode(_claims(), "a-different-key-that-is-long-enough-for-hs256", algorithm="HS256"),
        jwt.encode(_claims(tenant_id=None), OTHER_KEY, algorithm="HS256"),
        jwt.encode(_claims(exp=int(time.time()) - 120), OTHER_KEY, algorithm="HS256"),
    ):
        for _ in range(2):
            with pytest.raises(Unauthorized):
                verifier.verify(token)


def test_the_token_cache_is_bounded_and_drops_the_oldest() -> None:
    verifier = _verifier(_Clock(), cache_size=2)
    tokens = [jwt.encode(_claims(sub=f"user-{n}"), OTHER_KEY, algorithm="HS256") for n in range(3)]
    principals = [verifier.verify(token) for token in tokens]
    assert verifier.verify(tokens[2]) is principals[2]
    assert verifier.verify(tokens[1]) is principals[1]
    again = verifier.verify(tokens[0])  # evicted by the third: decoded afresh
    assert again == principals[0]
    assert again is not principals[0]


def test_a_zero_size_cache_decodes_every_time() -> None:
    verifier = _verifier(_Clock(), cache_size=0)
    token = jwt.encode(_claims(), OTHER_KEY, algorithm="HS256")
    assert verifier.verify(token) is not verifier.verify(token)
