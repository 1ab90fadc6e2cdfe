"""Built-in task kinds. Each registers its handlers with the process's registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_orchestrator.queue.registry import HandlerRegistry, SessionOnClaim

if TYPE_CHECKING:
    from agent_orchestrator.state import AppState


def register_builtin_kinds(registry: HandlerRegistry, state: AppState) -> None:
    from agent_orchestrator.queue.tasks.batch_tasks import register_batch_kinds
    from agent_orchestrator.queue.tasks.chat_tasks import ChatTurn
    from agent_orchestrator.services.orchestrator import CHAT_KIND

    turn = ChatTurn(
        settings=state.settings,
        coordinator=state.coordinator,
        sessions=state.sessions,
        ledger=state.ledger,
        bus=state.bus,
        remote_conversation=bool(state.settings.conversation_service_url),
        budget=state.budget,
    )
    registry.register(
        CHAT_KIND,
        turn.run,
        on_settled=turn.settled,
        on_claimed=SessionOnClaim(move=turn.processing, moved=turn.claimed),
    )
    turn.kinds.add(CHAT_KIND)
    register_batch_kinds(registry, turn, state.batches, state.webhooks)
    state.ledger.on_ended_elsewhere(turn.ended_elsewhere)
