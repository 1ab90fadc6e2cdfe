"""Query service (RAG): knowledge search (docs/contracts/query.md)."""

from __future__ import annotations

from typing import Protocol

from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.models.agent import Source


class QueryClient(Protocol):
    async def search(
        self, ctx: CallContext, *, query: str, collection_ids: list[str], top_k: int
    ) -> list[Source]: ...
