"""The signing keys of another token issuer, read from its JWKS URL (`JWT_JWKS_URL`).

Keys are looked up by the token's `kid` without waiting: a token whose key is not held
(a new key after a rotation, or keys older than `refresh_after`) makes the caller
`refresh()` and try once more. Refreshes are serialised and at most one per
`min_interval` while keys are held, so tokens with made-up `kid`s cannot make this
service hammer the issuer (and a new key is seen at most `min_interval` after a fetch).
A failed refresh keeps the keys already held, and they keep serving while the issuer is
away; with none held, the token cannot be checked at all: 503, not 401.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt

from agent_orchestrator.errors import ServiceUnavailable
from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)


class KeyNotHeld(Exception):
    """The token's key is not among those held (or they are stale): refresh, then retry."""


class JwksKeys:
    def __init__(
        self,
        url: str,
        algorithm: str,
        *,
        refresh_after: float = 300.0,
        min_interval: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.key_type = "RSA" if algorithm.startswith(("RS", "PS")) else "EC"
        self.refresh_after = refresh_after
        self.min_interval = min_interval
        self.timeout = timeout
        self._clock = clock
        self._keys: dict[str | None, Any] = {}
        self._fetched_at = -float("inf")
        self._tried_at = -float("inf")
        self._lock = asyncio.Lock()

    def key_for(self, token: str) -> Any:
        """The key that should have signed `token`; KeyNotHeld when it is not held, or
        when the keys are stale. A token that is not a JWT at all is jwt.DecodeError."""
        kid = jwt.get_unverified_header(token).get("kid")
        now = self._clock()
        if (
            now - self._fetched_at > self.refresh_after
            and now - self._tried_at >= self.min_interval
        ):
            raise KeyNotHeld(
                kid
            )  # stale, and not tried lately: refresh (held keys serve meanwhile)
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid not in self._keys:
            raise KeyNotHeld(kid)
        return self._keys[kid]

    async def refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if now - self._tried_at < self.min_interval:
                # Asked very recently: what is held is what the issuer publishes, and if
                # nothing is, fail at once rather than queue every request behind a fetch.
                if not self._keys:
                    raise self._unavailable()
                return
            self._tried_at = now
            try:
                self._keys = await self._fetch()
                self._fetched_at = self._clock()
            except Exception as error:  # unreachable, not JSON, not a key set
                log.warning("JWKS not refreshed", url=self.url, error=repr(error))
                if not self._keys:
                    raise self._unavailable() from error

    def _unavailable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            "the token issuer's keys could not be fetched; retry",
            details={"jwks_url": self.url},
        )

    async def _fetch(self) -> dict[str | None, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.url) as response,
        ):
            response.raise_for_status()
            document = await response.json(content_type=None)
        found = jwt.PyJWKSet.from_dict(document)
        keys = {
            key.key_id: key.key
            for key in found.keys
            if key.key_type == self.key_type and key.public_key_use in (None, "sig")
        }
        if not keys:
            raise ValueError(f"no {self.key_type} signing key in the set")
        return keys
