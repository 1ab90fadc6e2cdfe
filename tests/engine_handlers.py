"""Task kinds for the engine's tests, loaded by workers through TASK_HANDLER_MODULES.

Side effects go to tables the handlers create on first use, keyed by task id, so a test
can count how often a handler ran and check an effect exists exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from agent_orchestrator.queue.consumer import TaskContext
from agent_orchestrator.queue.registry import HandlerRegistry, TaskFailure

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS test_effects (task_id VARCHAR(64) PRIMARY KEY, note TEXT)",
    "CREATE TABLE IF NOT EXISTS test_runs (task_id VARCHAR(64), attempt INTEGER, worker TEXT)",
)


async def _record_run(ctx: TaskContext) -> None:
    async with ctx.db_factory() as db:
        if db.get_bind().dialect.name == "postgresql":
            # Two CREATE TABLE IF NOT EXISTS at once can both try to create the table's
            # type, and one fails (pg_type's unique index): one creator at a time.
            await db.execute(text("SELECT pg_advisory_xact_lock(4242)"))
        for statement in _SCHEMA:
            await db.execute(text(statement))
        await db.execute(
            text("INSERT INTO test_runs (task_id, attempt, worker) VALUES (:t, :a, :w)"),
            {"t": str(ctx.task.id), "a": ctx.attempt, "w": ctx.worker_id},
        )
        await db.commit()


async def _write_effect(ctx: TaskContext, note: str) -> None:
    # Idempotent by construction: at-least-once execution, exactly-once effect.
    async with ctx.db_factory() as db:
        await db.execute(
            text(
                "INSERT INTO test_effects (task_id, note) VALUES (:t, :n) "
                "ON CONFLICT (task_id) DO NOTHING"
            ),
            {"t": str(ctx.task.id), "n": note},
        )
        await db.commit()


async def sleep_then_write(ctx: TaskContext) -> dict[str, Any]:
    await _record_run(ctx)
    seconds = float(ctx.task.input.get("seconds", 0.1))
    steps = int(ctx.task.input.get("steps", 1))
    for step in range(steps):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(step + 1, steps)
    await _write_effect(ctx, "done")
    return {"slept": seconds}


async def parallel_steps(ctx: TaskContext) -> dict[str, Any]:
    """`steps` steps that finish together, each reporting its progress, as a plan's
    parallel steps do."""
    steps = int(ctx.task.input.get("steps", 5))
    await asyncio.gather(*(ctx.progress(step + 1, steps) for step in range(steps)))
    return {"steps": steps}


async def flaky(ctx: TaskContext) -> dict[str, Any]:
    await _record_run(ctx)
    if ctx.attempt < int(ctx.task.input.get("succeed_on", 2)):
        raise TaskFailure("downstream_unavailable", "try again", retryable=True)
    return {"attempt": ctx.attempt}


async def fatal(ctx: TaskContext) -> dict[str, Any]:
    await _record_run(ctx)
    raise TaskFailure("bad_input", "this cannot work", retryable=False)


async def crash(ctx: TaskContext) -> dict[str, Any]:
    await _record_run(ctx)
    raise RuntimeError("secret internal detail")


def register(registry: HandlerRegistry) -> None:
    registry.register("test.sleep", sleep_then_write)
    registry.register("test.parallel_steps", parallel_steps)
    registry.register("test.flaky", flaky)
    registry.register("test.fatal", fatal)
    registry.register("test.crash", crash)
    registry.register("test.bulk_sleep", sleep_then_write, bulk=True)
