"""Task kinds and their handlers. A kind names its queue (interactive or bulk work)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent_orchestrator.db.repositories.sessions import SessionMove
from agent_orchestrator.db.tables import SessionRow, TaskRow
from agent_orchestrator.events.bus import KeyWrite
from agent_orchestrator.events.models import Event

if TYPE_CHECKING:
    from agent_orchestrator.queue.consumer import TaskContext

Handler = Callable[["TaskContext"], Coroutine[Any, Any, dict[str, Any] | None]]
#: Called after an attempt ended in this process (finished, failed, retried later,
#: cancelled or timed out), once its state is committed: e.g. to wake the session's next turn.
SettledHook = Callable[[TaskRow], Coroutine[Any, Any, None]]
#: Awaited after the claim's commit; returns events to publish right after `running`, in
#: the same publish (one round trip on Redis), before the handler's first event, and the
#: keys that publish sets first (a session's hot copy).
ClaimFollowUp = Callable[[], Coroutine[Any, Any, tuple[list[Event], list[KeyWrite]]]]


@dataclass(frozen=True)
class SessionOnClaim:
    """A kind whose task's session changes as an attempt starts (chat: `processing`)."""

    #: The session's transition: sent with the claim, in its statement on PostgreSQL.
    move: SessionMove
    #: Once the claim is committed, with the session's row as the claim moved it and that
    #: `now`: what to publish right after `running`.
    moved: Callable[[TaskRow, SessionRow, datetime], ClaimFollowUp]


class TaskFailure(Exception):
    """Raised by a handler: a failure with a stable code; `retryable` asks for a retry."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class TaskKind:
    name: str
    handler: Handler
    bulk: bool = False
    on_settled: SettledHook | None = None
    on_claimed: SessionOnClaim | None = None


class HandlerRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, TaskKind] = {}

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        bulk: bool = False,
        on_settled: SettledHook | None = None,
        on_claimed: SessionOnClaim | None = None,
    ) -> None:
        self._kinds[name] = TaskKind(name, handler, bulk, on_settled, on_claimed)

    def get(self, name: str) -> TaskKind | None:
        return self._kinds.get(name)

    def names(self) -> list[str]:
        return sorted(self._kinds)


def load_handler_modules(registry: HandlerRegistry, modules: list[str]) -> None:
    """TASK_HANDLER_MODULES: each module exposes `register(registry)`."""
    for name in modules:
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if not callable(register):
            raise RuntimeError(f"{name} has no register(registry) function")
        register(registry)
