"""Who is calling: built by the request layer's authentication, passed explicitly to every
service call."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PrincipalKind(StrEnum):
    USER = "user"
    SERVICE = "service"


class Scope(StrEnum):
    CHAT_WRITE = "chat:write"
    SESSIONS_READ = "sessions:read"
    SESSIONS_WRITE = "sessions:write"
    TASKS_READ = "tasks:read"
    TASKS_WRITE = "tasks:write"
    BATCH_READ = "batch:read"
    BATCH_WRITE = "batch:write"
    ADMIN = "admin"


#: What `agent-orchestrator token` grants when no scope is named: everything but admin.
USER_SCOPES: tuple[str, ...] = tuple(scope.value for scope in Scope if scope is not Scope.ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    user_id: str
    scopes: frozenset[str]
    kind: PrincipalKind = PrincipalKind.USER
    expires_at: float | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes or Scope.ADMIN.value in self.scopes

    def same_caller(self, other: Principal) -> bool:
        """The same tenant and user (scopes and expiry may differ): what a socket's new
        token, or a new answer about its token, must keep."""
        return (self.tenant_id, self.user_id) == (other.tenant_id, other.user_id)
