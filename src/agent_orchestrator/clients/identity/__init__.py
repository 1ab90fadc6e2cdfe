"""Identity service: introspection of tokens we did not issue (docs/contracts/identity.md)."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field

from agent_orchestrator.clients.base import CallContext


class TokenInfo(BaseModel):
    """RFC 7662 style. An inactive token is an answer (`active` False), not an error."""

    active: bool
    sub: str | None = None
    tenant_id: str | None = None
    scopes: list[str] = Field(default_factory=list)
    exp: int | None = None


class IdentityClient(Protocol):
    async def introspect(self, ctx: CallContext, *, token: str) -> TokenInfo: ...
