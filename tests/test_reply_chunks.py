"""A streamed reply's pieces become chunk events: the first at once, later ones coalesced
while an event is being published; indexes count events, chunks concatenate to the reply,
and a stream step publishes every piece it received before it ends, fails or is retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent_orchestrator.clients.base import CallContext, DownstreamError
from agent_orchestrator.models.agent import ReplyChunk, ReplyDone
from agent_orchestrator.models.orchestration import (
    OrchestrationPlan,
    RetryPolicy,
    ServiceCall,
    StepOutcome,
)
from agent_orchestrator.services.reply_chunks import ChunkForwarder
from agent_orchestrator.services.service_coordinator import (
    PlanFailed,
    PlanRun,
    ResilienceSettings,
    ServiceCoordinator,
    StreamedReply,
)


class Publisher:
    """An on_chunk whose every publish takes `delay` seconds (a Redis round trip)."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.delay = delay
        self.fail_at = fail_at
        self.events: list[ReplyChunk] = []

    async def __call__(self, chunk: ReplyChunk) -> None:
        if self.fail_at is not None and chunk.index == self.fail_at:
            raise ConnectionError("bus down")
        await asyncio.sleep(self.delay)
        self.events.append(chunk)


async def test_a_slow_stream_gets_one_event_per_piece() -> None:
    publish = Publisher()
    forward = ChunkForwarder(publish)
    for piece in ("a ", "b ", "c"):
        await forward.add(piece)
        await asyncio.sleep(0.01)  # the next piece comes after the last publish ended
    await forward.flush()
    assert [(e.content, e.index) for e in publish.events] == [("a ", 0), ("b ", 1), ("c", 2)]


async def test_pieces_arriving_during_a_publish_become_one_event() -> None:
    publish = Publisher(delay=0.02)
    forward = ChunkForwarder(publish)
    await forward.add("first ")  # published before add returns
    assert [e.content for e in publish.events] == ["first "]
    for piece in ("b ", "c ", "d "):
        await forward.add(piece)
    await asyncio.sleep(0.005)  # the background publish of "b " is under way
    for piece in ("e ", "f"):
        await forward.add(piece)
    await forward.flush()
    assert [(e.content, e.index) for e in publish.events] == [
        ("first ", 0),
        ("b c d ", 1),
        ("e f", 2),
    ]


async def test_a_failed_background_publish_surfaces() -> None:
    forward = ChunkForwarder(Publisher(fail_at=1))
    await forward.add("a")
    await forward.add("b")
    with pytest.raises(ConnectionError):
        await forward.flush()


async def test_cancel_drops_what_is_queued() -> None:
    publish = Publisher(delay=0.05)
    forward = ChunkForwarder(publish)
    await forward.add("a")
    await forward.add("b")
    await asyncio.sleep(0)
    forward.cancel()
    await asyncio.sleep(0.1)
    assert [e.content for e in publish.events] == ["a"]


# --- through the coordinator's stream step --------------------------------------------


class FakeExecution:
    """An agent execution client yielding `pieces` (each after `gap` seconds), then done,
    or failing with `error` after them."""

    def __init__(
        self, pieces: list[str], *, gap: float = 0.0, error: DownstreamError | None = None
    ) -> None:
        self.pieces = pieces
        self.gap = gap
        self.error = error
        self.calls = 0

    async def execute(self, ctx: CallContext, **_: Any) -> AsyncIterator[Any]:
        self.calls += 1
        for index, piece in enumerate(self.pieces):
            if self.gap:
                await asyncio.sleep(self.gap)
            yield ReplyChunk(content=piece, index=index)
        if self.error is not None:
            raise self.error
        yield ReplyDone()


PLAN = OrchestrationPlan(
    "stream",
    (
        ServiceCall(
            step="generate",
            service="agent_execution",
            operation="execute",
            stream=True,
            retry=RetryPolicy(attempts=3, initial=0.01),
        ),
    ),
)


async def run_plan(
    execution: FakeExecution, publish: Publisher, coordinator: ServiceCoordinator | None = None
) -> tuple[Any, list[str]]:
    seen: list[str] = []

    async def on_progress(done: int, total: int) -> None:
        seen.append(f"progress {done}/{total}")

    async def on_chunk(chunk: ReplyChunk) -> None:
        await publish(chunk)
        seen.append("chunk")

    async def ignore(*_: Any) -> None:
        return None

    run = PlanRun(
        ctx=CallContext(tenant_id="t"),
        request={},
        on_chunk=on_chunk,
        on_progress=on_progress,
        on_warning=ignore,
        on_step=ignore,
    )
    if coordinator is None:
        coordinator = ServiceCoordinator({"agent_execution": execution}, ResilienceSettings())
    try:
        outcomes: dict[str, StepOutcome] = await coordinator.run(PLAN, run)
    except PlanFailed as failure:
        return failure, seen
    return outcomes["generate"].output, seen


async def test_an_instant_stream_is_two_events_that_make_the_reply() -> None:
    pieces = [f"word{i} " for i in range(12)]
    publish = Publisher()
    reply, seen = await run_plan(FakeExecution(pieces), publish)
    assert isinstance(reply, StreamedReply)
    assert reply.content == "".join(pieces)
    assert [e.index for e in publish.events] == [0, 1]
    assert "".join(e.content for e in publish.events) == reply.content
    assert seen == ["chunk", "chunk", "progress 1/1"]  # every chunk before the step ends


async def test_a_paced_stream_keeps_one_event_per_piece() -> None:
    publish = Publisher()
    reply, _ = await run_plan(FakeExecution(["a ", "b ", "c"], gap=0.01), publish)
    assert isinstance(reply, StreamedReply)
    assert [e.content for e in publish.events] == ["a ", "b ", "c"]


async def test_pieces_before_a_failure_are_published_and_not_retried() -> None:
    cut = DownstreamError("agent_execution", "stream_cut", "cut", retryable=True)
    execution = FakeExecution(["a ", "b ", "c "], error=cut)
    publish = Publisher()
    failure, _ = await run_plan(execution, publish)
    assert isinstance(failure, PlanFailed)
    assert failure.error.code == "stream_cut"
    assert "".join(e.content for e in publish.events) == "a b c "
    assert execution.calls == 1  # chunks were forwarded: a retry would repeat them


async def test_a_failed_chunk_publish_fails_the_step() -> None:
    with pytest.raises(ExceptionGroup) as caught:  # as any failure that is not a step's
        await run_plan(FakeExecution(["a ", "b ", "c "]), Publisher(fail_at=1))
    assert caught.group_contains(ConnectionError)


async def test_a_failed_chunk_publish_gives_a_half_open_probe_back() -> None:
    """Our own failure (Redis away while publishing a chunk) says nothing of the service:
    the half-open breaker's probe slot comes back, or every later call would fail fast."""
    execution = FakeExecution(["a ", "b "])
    settings = ResilienceSettings(failure_threshold=1, open_seconds=0.05, half_open_probes=1)
    coordinator = ServiceCoordinator({"agent_execution": execution}, settings)
    breaker = coordinator.breaker("agent_execution")
    opened = breaker.admit()
    assert opened is not None
    opened.failed()
    assert breaker.admit() is None  # open
    await asyncio.sleep(0.1)  # half-open: one probe may go
    with pytest.raises(ExceptionGroup):
        await run_plan(execution, Publisher(fail_at=0), coordinator)
    probe = breaker.admit()
    assert probe is not None, "the probe's slot was kept by the failed call"
    probe.succeeded()
