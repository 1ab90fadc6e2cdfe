"""The RQ side of the queue benchmark: the same work as `bench.handlers.io_task`.

RQ 3 runs an `async def` job under `asyncio.run` in the forked work horse, a fresh event
loop per job."""

from __future__ import annotations

import asyncio
import time


async def io_job(seconds: float = 0.2) -> float:
    started = time.time()
    if seconds > 0:
        await asyncio.sleep(seconds)
    return started
