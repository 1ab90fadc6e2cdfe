"""What the handshake alone decides: is the page's Origin allowed, which address the client
has, and which token (if any) it offered as a subprotocol.

Origin is the browser's defence against cross-site WebSocket hijacking: a page on another
site can open a socket to us with the user's cookies, and only the Origin header tells.
CORS does not apply to WebSocket upgrades, so it is checked here, before accepting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import Scope

from agent_orchestrator.middleware.context import peer_address

#: The subprotocol a client offers next to its token, and the only one we echo back.
BEARER = "bearer"


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class OriginPolicy:
    def __init__(self, allowed: Iterable[str], *, allow_missing: bool) -> None:
        self._allowed = frozenset(normalise_origin(item) for item in allowed)
        self._any = "*" in self._allowed
        self._allow_missing = allow_missing

    def permits(self, origin: str | None) -> bool:
        if origin is None:
            return self._allow_missing
        return self._any or normalise_origin(origin) in self._allowed


def client_address(scope: Scope) -> str:
    """The peer's address (`peer_address`), with "unknown" standing for none so the per-IP
    cap still counts such sockets together."""
    return peer_address(scope) or "unknown"


def offered_token(scope: Mapping[str, Any]) -> tuple[bool, str | None]:
    """(bearer offered, token): the client asks for subprotocols ["bearer", "<jwt>"].
    The token never appears in a URL, so it stays out of access logs and proxies' logs."""
    offered = [item for item in scope.get("subprotocols", []) if item]
    if BEARER not in offered:
        return False, None
    rest = [item for item in offered if item != BEARER]
    return True, rest[0] if len(rest) == 1 else None
