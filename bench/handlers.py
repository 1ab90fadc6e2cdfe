"""Task kinds for the benchmarks, loaded by a worker through TASK_HANDLER_MODULES=bench.handlers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent_orchestrator.queue.consumer import TaskContext
from agent_orchestrator.queue.registry import HandlerRegistry


async def io_task(ctx: TaskContext) -> dict[str, Any]:
    """Stand-in for an I/O-bound task (a downstream call): await `seconds` and return the
    wall-clock time the handler started, which the latency benchmark reads back."""
    started = time.time()
    seconds = float(ctx.task.input.get("seconds", 0.2))
    if seconds > 0:
        await asyncio.sleep(seconds)
    return {"started": started}


def register(registry: HandlerRegistry) -> None:
    registry.register("bench.io", io_task)
