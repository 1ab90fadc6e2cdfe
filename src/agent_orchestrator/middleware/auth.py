"""Authentication: the request layer turns `Authorization: Bearer <JWT>` into a `Principal`;
route dependencies then demand a scope (403) or a principal at all (401).

Tokens are verified with a pinned algorithm list, `exp` required, `iss`/`aud` checked when
configured and a bounded clock skew. Header fields such as `jku` or `x5u` are never
followed: the key is the configured one (the secret, the issuer's public key file), or one
of the keys fetched from the configured `JWT_JWKS_URL`, which `kid` only selects among.

A client sends the same token on every request until it expires, and decoding it is most
of what authentication costs, so tokens that passed are remembered (bounded, keyed by the
exact token string) and only their expiry is checked again on later requests.

With `IDENTITY_SERVICE_URL` set, a token this service did not sign (an opaque token, or a
JWT of another issuer) is asked of the Identity Service (`Introspector`), and its answer
remembered for `IDENTITY_CACHE_SECONDS`. A token of ours that fails (expired, a missing
claim) is never sent there.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Coroutine
from typing import Any

import jwt
from fastapi import Request
from structlog.contextvars import get_contextvars

from agent_orchestrator.clients.base import CallContext, DownstreamError
from agent_orchestrator.clients.identity import IdentityClient
from agent_orchestrator.errors import (
    Forbidden,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
    field_problem,
)
from agent_orchestrator.middleware.jwks import JwksKeys, KeyNotHeld
from agent_orchestrator.models.principal import Principal, PrincipalKind
from agent_orchestrator.models.storable import storable_text
from agent_orchestrator.services.rate_limiter import RateLimiter

_MAX_ID = 128


class TokenVerifier:
    def __init__(
        self,
        secret: Any,
        *,
        algorithm: str = "HS256",
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 30,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        keys: JwksKeys | None = None,
    ) -> None:
        self._secret = secret
        #: another issuer's keys by `kid` (JWT_JWKS_URL), used instead of `secret`
        self.keys = keys
        self._algorithms = [algorithm]
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._cache_size = cache_size
        self._clock = clock
        # token -> (principal, exp as PyJWT compared it). Only tokens that passed every
        # check get in; the signature, iss, aud, nbf and iat cannot change for the same
        # string (nbf and iat only ever get further into the past), exp can.
        self._verified: dict[str, tuple[Principal, int]] = {}

    def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            # The comparison PyJWT makes: expired once exp <= now - leeway.
            if expires > self._clock() - self._leeway:
                return principal
            self._verified.pop(token, None)
            raise Unauthorized("token has expired")
        principal, expires = self._decode(token)
        if self._cache_size > 0:
            if len(self._verified) >= self._cache_size:
                # Oldest first: dicts keep insertion order, and an evicted token that is
                # still in use just pays one more full decode.
                self._verified.pop(next(iter(self._verified)))
            self._verified[token] = (principal, expires)
        return principal

    def _decode(self, token: str) -> tuple[Principal, int]:
        required = (
            ["exp", "sub"] + (["iss"] if self._issuer else []) + (["aud"] if self._audience else [])
        )
        try:
            key = self._secret if self.keys is None else self.keys.key_for(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": required, "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token has expired") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim!r} claim") from exc
        except jwt.PyJWTError as exc:
            raise NotOurToken("token is not valid") from exc
        # PyJWT has checked that int() of exp works and compared exactly this value.
        return _principal_from(claims), int(claims["exp"])

    def issue(
        self,
        *,
        tenant_id: str,
        user_id: str,
        scopes: list[str],
        ttl_seconds: int,
        now: float,
    ) -> str:
        claims: dict[str, Any] = {
            "sub": user_id,
            "tenant_id": tenant_id,
            "scopes": " ".join(scopes),
            "iat": int(now),
            "exp": int(now) + ttl_seconds,
        }
        if not isinstance(self._secret, str) or self.keys is not None:
            raise ValueError(
                f"this service verifies {self._algorithms[0]} tokens of another issuer "
                "(JWT_PUBLIC_KEY_FILE) and cannot sign them"
            )
        if self._issuer:
            claims["iss"] = self._issuer
        if self._audience:
            claims["aud"] = self._audience
        return jwt.encode(claims, self._secret, algorithm=self._algorithms[0])


class NotOurToken(Unauthorized):
    """Not a token this service signed: malformed, or signed with another key."""


class Introspector:
    """Tokens this service did not sign, asked of the Identity Service; each answer (active
    or not) is remembered for `cache_seconds`, an active one at most until its `exp`."""

    def __init__(
        self,
        cache_seconds: float,
        *,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        #: set with the lifespan's service directory; None: no Identity Service
        self.client: IdentityClient | None = None
        #: bounds the questions asked per client address (set with the lifespan's store)
        self.limiter: RateLimiter | None = None
        self.cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._clock = clock
        self._known: dict[str, tuple[Principal | None, float]] = {}

    async def principal(self, token: str, client_ip: str | None = None) -> Principal:
        """Raises Unauthorized for an inactive token, ServiceUnavailable when the Identity
        Service cannot answer (the caller may retry; nothing is remembered), RateLimited
        when `client_ip` has had too many tokens asked about."""
        now = self._clock()
        known = self._known.get(token)
        if known is not None and known[1] > now:
            return _active(known[0])
        if self.client is None:
            raise Unauthorized("token is not valid")
        if self.limiter is not None:
            decision = await self.limiter.check_introspection(client_ip)
            if decision is not None and not decision.allowed:
                raise decision.refusal()
        ctx = CallContext(tenant_id="", correlation_id=get_contextvars().get("correlation_id"))
        try:
            info = await self.client.introspect(ctx, token=token)
        except DownstreamError as error:
            raise ServiceUnavailable(
                "the identity service could not check the token; retry",
                details={"service": "identity", "code": error.code},
            ) from error
        principal: Principal | None = None
        until = now + self.cache_seconds
        if info.active and (info.exp is None or info.exp > now):
            principal = _principal_from(
                {
                    "tenant_id": info.tenant_id,
                    "sub": info.sub,
                    "scopes": info.scopes,
                    "exp": info.exp,
                }
            )
            if info.exp is not None:
                until = min(until, float(info.exp))
        if len(self._known) >= self._cache_size:
            self._known.pop(next(iter(self._known)))
        self._known[token] = (principal, until)
        return _active(principal)

    def answered(self, token: str) -> bool:
        """Whether `token` was introspected (its answer is held): its socket needs asking
        about again (websocket/revalidation.py)."""
        return token in self._known


def _active(principal: Principal | None) -> Principal:
    if principal is None:
        raise Unauthorized("token is not active")
    return principal


async def resolve(
    verifier: TokenVerifier,
    introspector: Introspector | None,
    token: str,
    client_ip: str | None = None,
) -> Principal:
    """The principal of a bearer token: ours, verified here; another's, introspected.
    With JWKS keys, a token whose key is not held yet gets one refresh of the keys."""
    try:
        try:
            return verifier.verify(token)
        except KeyNotHeld:
            assert verifier.keys is not None
            await verifier.keys.refresh()
            try:
                return verifier.verify(token)
            except KeyNotHeld as still:
                raise NotOurToken("the token's signing key is not published") from still
    except NotOurToken:
        if introspector is None or introspector.client is None:
            raise
        return await introspector.principal(token, client_ip)


def _principal_from(claims: dict[str, Any]) -> Principal:
    tenant = claims.get("tenant_id")
    subject = claims.get("sub")
    for name, value in (("tenant_id", tenant), ("sub", subject)):
        if not isinstance(value, str) or not value or len(value) > _MAX_ID:
            raise Unauthorized(f"token claim {name!r} must be a non-empty string")
        try:
            storable_text(value)  # it is written to the database as is
        except ValueError as error:
            raise Unauthorized(f"token claim {name!r} {error}") from error
    raw = claims.get("scopes", claims.get("permissions", []))
    if isinstance(raw, str):
        scopes = frozenset(raw.split())
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        scopes = frozenset(raw)
    else:
        raise Unauthorized("token claim 'scopes' must be a string or a list of strings")
    expires = claims.get("exp")
    return Principal(
        tenant_id=str(tenant),
        user_id=str(subject),
        scopes=scopes,
        kind=PrincipalKind.USER,
        expires_at=float(expires) if isinstance(expires, int | float) else None,
    )


def _bearer(value: bytes) -> str:
    """The token of an `Authorization` value, or "" when it is not `Bearer <token>`."""
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else ""


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            return _bearer(value)
    return None


async def authenticate(
    verifier: TokenVerifier,
    introspector: Introspector | None,
    authorization: bytes | None,
    state: dict[str, Any],
    client_ip: str | None = None,
) -> None:
    """Verifies the bearer token once per request (the first `Authorization` header) and
    leaves the outcome in the scope's state: `principal` on success, `auth_error` on a bad
    token (or an Identity Service that cannot answer), neither without a header. Routes
    decide what they need."""
    if authorization is None:
        return
    token = _bearer(authorization)
    if not token:
        state["auth_error"] = Unauthorized("Authorization must be 'Bearer <token>'")
        return
    try:
        state["principal"] = await resolve(verifier, introspector, token, client_ip)
    except ServiceError as error:  # a bad token, or one that cannot be checked now
        state["auth_error"] = error


AuthDependency = Callable[[Request], Coroutine[Any, Any, Principal]]


def _mark(dependency: AuthDependency) -> AuthDependency:
    # The route inventory test looks for this marker on every route's dependency tree.
    dependency.requires_auth = True  # type: ignore[attr-defined]
    return dependency


def current_principal(request: Request) -> Principal:
    error = getattr(request.state, "auth_error", None)
    if error is not None:
        raise error
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Unauthorized()
    return principal


def require_scope(scope: str) -> AuthDependency:
    async def dependency(request: Request) -> Principal:
        principal = current_principal(request)
        if not principal.has_scope(scope):
            needed = str(scope)
            raise Forbidden(f"this operation needs the '{needed}' scope", details={"scope": needed})
        return principal

    dependency.__name__ = f"require_scope_{scope.replace(':', '_')}"
    return _mark(dependency)


async def _require_service(request: Request) -> Principal:
    """For `/internal/*`: only the service token, compared in constant time. The tenant the
    call acts for comes from `X-Tenant-ID`."""
    configured = request.app.state.core.settings.service_token
    expected = configured.get_secret_value().encode() if configured else None
    token = bearer_token(list(request.scope.get("headers", [])))
    if expected is None or not token or not hmac.compare_digest(token.encode(), expected):
        raise Unauthorized("a valid service token is required")
    tenant = request.headers.get("x-tenant-id", "")
    if not tenant or len(tenant) > _MAX_ID:
        # Every internal call acts for one tenant; none for "" (a missing header).
        raise ValidationFailed(
            "X-Tenant-ID must name the tenant the call acts for",
            details=[field_problem("X-Tenant-ID", "header", f"required, 1-{_MAX_ID} characters")],
        )
    return Principal(
        tenant_id=tenant,
        user_id="service",
        scopes=frozenset({"admin"}),
        kind=PrincipalKind.SERVICE,
    )


require_service = _mark(_require_service)
