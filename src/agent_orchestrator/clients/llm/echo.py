"""The echo model: what answers when no LLM is configured. Deterministic, instant, and
plain about being a stand-in, so a fresh install works end to end without a model."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from agent_orchestrator.models.agent import ExecutionEvent, ReplyChunk, ReplyDone, Usage

_PIECES = re.compile(r"\S+\s*")


def echo_reply(messages: list[dict[str, Any]]) -> str:
    user_turns = [m["content"] for m in messages if m.get("role") == "user"]
    last = user_turns[-1] if user_turns else ""
    earlier = sum(1 for m in messages if m.get("role") in ("user", "assistant")) - 1
    reply = f"[echo model] You said: {last}"
    if earlier > 0:
        reply += f" (I can see {earlier} earlier messages in this conversation.)"
    return reply + " Configure LLM_BASE_URL to use a real model."


class EchoModel:
    name = "echo"

    def __init__(self, chunk_delay: float = 0.0) -> None:
        self.chunk_delay = chunk_delay

    async def stream(
        self, messages: list[dict[str, Any]], *, model: str | None, temperature: float | None
    ) -> AsyncIterator[ExecutionEvent]:
        reply = echo_reply(messages)
        pieces = _PIECES.findall(reply)
        for index, piece in enumerate(pieces):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            yield ReplyChunk(content=piece, index=index)
        prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
        yield ReplyDone(
            usage=Usage(prompt_tokens=prompt, completion_tokens=len(pieces)),
            finish_reason="stop",
            model="echo",
        )

    async def aclose(self) -> None:
        return None
