"""Embedding service: texts in, vectors out (docs/contracts/embedding.md)."""

from __future__ import annotations

from typing import Protocol

from agent_orchestrator.clients.base import CallContext


class EmbeddingClient(Protocol):
    async def embed(self, ctx: CallContext, *, texts: list[str]) -> list[list[float]]:
        """One vector per text, in the order of `texts`, all of the same length."""
        ...
