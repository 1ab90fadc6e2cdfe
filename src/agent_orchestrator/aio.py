"""Small asyncio helpers the engine's background loops share."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], within: float = 5.0) -> None:
    """Cancel a background task and wait for it to end. Some libraries swallow a
    CancelledError on their way out (the task then keeps running), so cancel again
    until the task is done or `within` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if task.done() and not task.cancelled():
        task.exception()  # retrieve it so asyncio does not log "never retrieved"
