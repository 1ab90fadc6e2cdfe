"""Built-in task kinds. Each module registers its handlers with the process's registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_orchestrator.queue.registry import HandlerRegistry

if TYPE_CHECKING:
    from agent_orchestrator.state import AppState


def register_builtin_kinds(registry: HandlerRegistry, state: AppState) -> None:
    """The chat issue adds the first real kind here; tests register their own through
    TASK_HANDLER_MODULES."""
    del registry, state
