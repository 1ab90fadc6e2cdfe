"""Task kinds and their handlers. A kind names its queue (interactive or bulk work)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.tables import TaskRow
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
#: Runs on the claim's database session once the task is `running` (see
#: `TaskLedger.claim_then`): writes that begin with the attempt (chat marks its session
#: `processing`) cost no session of their own.
ClaimHook = Callable[[AsyncSession, TaskRow], Coroutine[Any, Any, ClaimFollowUp | None]]


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
    on_claimed: ClaimHook | None = None


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
        on_claimed: ClaimHook | None = None,
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
