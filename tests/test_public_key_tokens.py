"""Tokens of another issuer verified here with its public key (JWT_ALGORITHM RS*/ES*,
JWT_PUBLIC_KEY_FILE): they authenticate; the classic forgeries do not (HS256 keyed with
the public key, `alg: none`, another issuer's key); a key file that cannot serve stops
start-up, naming the variable; and this service refuses to sign such tokens itself."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from agent_orchestrator.config import Settings, format_settings_error
from agent_orchestrator.middleware.jwks import JwksKeys, KeyNotHeld
from tests.conftest import auth, clean_env, running_app
from tests.doubles.http_thread import QuietHandler, serving
from tests.processes import CLI

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(algorithm: str) -> PrivateKey:
    if algorithm.startswith("RS"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1() if algorithm == "ES256" else ec.SECP384R1())


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "alice",
        "tenant_id": "acme",
        "scopes": "sessions:read",
        "exp": int(time.time()) + 600,
        **extra,
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT put together by hand, as a forger would (PyJWT refuses to make these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_the_issuers_tokens_pass_and_forgeries_do_not(
    algorithm: str, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    issuer_key = new_key(algorithm)
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(public_pem(issuer_key))
    settings = make_settings(jwt_algorithm=algorithm, jwt_public_key_file=key_file)
    async with running_app(settings) as client:

        async def status(token: str) -> int:
            return (await client.get("/api/v1/sessions", headers=auth(token))).status_code

        assert await status(jwt.encode(claims(), issuer_key, algorithm=algorithm)) == 200
        # Algorithm confusion: HS256 keyed with the public key, which anyone has.
        confused = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(issuer_key))
        assert await status(confused) == 401
        assert await status(hand_signed({"alg": "none", "typ": "JWT"}, claims(), None)) == 401
        someone_else = jwt.encode(claims(), new_key(algorithm), algorithm=algorithm)
        assert await status(someone_else) == 401
        expired = jwt.encode(claims(exp=int(time.time()) - 300), issuer_key, algorithm=algorithm)
        response = await client.get("/api/v1/sessions", headers=auth(expired))
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "token has expired"


def _refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    return format_settings_error(raised.value)


def test_a_key_file_that_cannot_serve_stops_start_up(tmp_path: Path) -> None:
    rsa_key = new_key("RS256")
    public = tmp_path / "public.pem"
    public.write_bytes(public_pem(rsa_key))
    private = tmp_path / "private.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    assert "JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL is required" in _refusal(jwt_algorithm="RS256")
    assert "only with those" in _refusal(jwt_public_key_file=public)  # HS256 has no use for it
    assert "never a private key" in _refusal(jwt_algorithm="RS256", jwt_public_key_file=private)
    assert "not a PEM key" in _refusal(jwt_algorithm="RS256", jwt_public_key_file=garbage)
    # An RSA key for an EC algorithm is not the issuer's key either.
    assert "not a PEM key for ES256" in _refusal(jwt_algorithm="ES256", jwt_public_key_file=public)
    missing = _refusal(jwt_algorithm="RS256", jwt_public_key_file=tmp_path / "absent.pem")
    assert "cannot read" in missing
    assert "JWT_PUBLIC_KEY_FILE" in missing


def test_the_token_command_refuses_to_sign_another_issuers_tokens(tmp_path: Path) -> None:
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(public_pem(new_key("RS256")))
    result = subprocess.run(
        [CLI, "token", "--tenant", "acme", "--user", "alice"],
        cwd=tmp_path,
        env=clean_env(
            JWT_ALGORITHM="RS256",
            JWT_PUBLIC_KEY_FILE=str(key_file),
            DATA_DIR=str(tmp_path / "data"),
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "cannot sign them" in result.stderr


class JwksServer:
    """The issuer's JWKS endpoint: a real HTTP server on loopback whose key set a test
    can replace (a rotation) or take down, counting the fetches."""

    def __init__(self) -> None:
        self.url = ""  # known once it serves (the `jwks` fixture)
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        self.down = False

    def handler(self) -> type[QuietHandler]:
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.fetches += 1
                if outer.down:
                    self.reply(503)
                    return
                self.reply(200, json.dumps(outer.document).encode(), "application/json")

        return Handler

    def publish(self, *keys: tuple[str, PrivateKey]) -> None:
        jwks = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        self.document = {"keys": jwks}


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    issuer = JwksServer()
    with serving(issuer.handler()) as base_url:
        issuer.url = f"{base_url}/.well-known/jwks.json"
        yield issuer


def signed(key: PrivateKey, kid: str) -> str:
    return jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})


async def test_jwks_keys_are_fetched_rotated_and_never_hammered(
    jwks: JwksServer, make_settings: Callable[..., Settings]
) -> None:
    first, second = new_key("RS256"), new_key("RS256")
    jwks.publish(("k1", first))
    settings = make_settings(jwt_algorithm="RS256", jwt_jwks_url=jwks.url)
    async with running_app(settings) as client:

        async def status(token: str) -> int:
            return (await client.get("/api/v1/sessions", headers=auth(token))).status_code

        assert await status(signed(first, "k1")) == 200
        assert await status(signed(first, "k1")) == 200
        assert jwks.fetches == 1  # fetched once, on the first token that needed it
        # Kids nobody published: 401, and no fetch while the keys are that fresh.
        assert await status(signed(second, "k2")) == 401
        assert await status(signed(second, "k3")) == 401
        assert await status(signed(second, "k4")) == 401
        assert jwks.fetches == 1
        # Someone else's key under a published kid is still refused.
        assert await status(signed(second, "k1")) == 401
        # The issuer rotates; past the refresh interval a token's new kid fetches the set.
        jwks.publish(("k1", first), ("k2", second))
        state = client.app.state.core  # type: ignore[attr-defined]
        state.verifier.keys.min_interval = 0
        assert await status(signed(second, "k2")) == 200
        assert jwks.fetches == 2


async def test_unreachable_jwks_with_no_keys_is_503(
    jwks: JwksServer, make_settings: Callable[..., Settings]
) -> None:
    jwks.down = True
    settings = make_settings(jwt_algorithm="RS256", jwt_jwks_url=jwks.url)
    token = signed(new_key("RS256"), "k1")
    async with running_app(settings) as client:
        answers = [await client.get("/api/v1/sessions", headers=auth(token)) for _ in range(3)]
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "service_unavailable"
        assert response.json()["error"]["details"] == {"jwks_url": jwks.url}
    assert jwks.fetches == 1  # the next requests failed at once, not each after a fetch


def test_jwks_and_a_key_file_exclude_each_other(tmp_path: Path) -> None:
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(public_pem(new_key("RS256")))
    both = _refusal(
        jwt_algorithm="RS256",
        jwt_public_key_file=key_file,
        jwt_jwks_url="https://issuer.example/.well-known/jwks.json",
    )
    assert "not both" in both
    assert "only with those" in _refusal(jwt_jwks_url="https://issuer.example/jwks.json")


async def test_held_keys_keep_serving_while_the_jwks_is_away(jwks: JwksServer) -> None:
    key = new_key("RS256")
    jwks.publish(("k1", key))
    now = [0.0]
    keys = JwksKeys(jwks.url, "RS256", refresh_after=300, min_interval=30, clock=lambda: now[0])
    token = signed(key, "k1")
    with pytest.raises(KeyNotHeld):
        keys.key_for(token)  # nothing held yet
    await keys.refresh()
    assert keys.key_for(token) is not None
    now[0] = 301.0  # stale: the next token asks for a refresh
    with pytest.raises(KeyNotHeld):
        keys.key_for(token)
    jwks.down = True
    await keys.refresh()  # fails, and keeps what it held
    assert keys.key_for(token) is not None
    assert jwks.fetches == 2
    now[0] = 340.0  # stale still, and the last try was long enough ago: try again
    with pytest.raises(KeyNotHeld):
        keys.key_for(token)
