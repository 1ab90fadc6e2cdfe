"""A Lua script through redis-py, on a client of its own, with concurrent calls sharing
round trips: the event bus's publishes and the rate limiter's checks.

Why not the shared client as it is: a command through its pool costs a checkout, a
liveness probe and a release, a chat turn publishes a dozen events, and every API request
checks its rate limits; a burst past the pool's size (100) would fail outright. Here one
call at a time goes straight to its own connection; calls that come while one is in
flight queue up and go next, together, as one pipeline. They keep their order (the
publish script gives each event a rising id).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

#: Longest wait for a reply: the connection is then dropped and made anew on next use.
REPLY_TIMEOUT = 5.0

_Call = tuple[list[str], list[Any], "asyncio.Future[Any]"]


def own_client(redis: Redis) -> Redis:
    """A client to the same server with the same options, with its own two connections
    (single calls, pipelines), no `socket_timeout` (redis-py wraps every send in a task
    to enforce it; REPLY_TIMEOUT is one timer per call instead), and one more try on a
    new connection when the old one broke (Redis restarted, or closed it as idle)."""
    pool = redis.connection_pool
    kwargs = {
        **pool.connection_kwargs,
        "socket_timeout": None,
        "retry": Retry(NoBackoff(), 1),
    }
    own = ConnectionPool(connection_class=pool.connection_class, max_connections=2, **kwargs)
    return Redis(connection_pool=own, single_connection_client=True)


class ScriptBatcher:
    def __init__(self, redis: Redis, script: str) -> None:
        self._redis = own_client(redis)
        # EVALSHA; on NOSCRIPT (Redis restarted or flushed) SCRIPT LOAD, then again.
        self._script = self._redis.register_script(script)
        self._busy = False
        self._queued: list[_Call] = []
        self._batches: set[asyncio.Task[None]] = set()

    async def run(self, keys: list[str], args: list[Any]) -> Any:
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            self._queued.append((keys, args, future))
            return await future
        self._busy = True
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await self._script(keys=keys, args=args)
        finally:
            self._next()

    def _next(self) -> None:
        if not self._queued:
            self._busy = False
            return
        batch, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[_Call]) -> None:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                pipe = self._redis.pipeline(transaction=False)
                for keys, args, _ in batch:
                    pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
                for (keys, args, future), result in zip(batch, results, strict=True):
                    if isinstance(result, NoScriptError):
                        result = await self._script(keys=keys, args=args)
                    _settle(future, result)
        except Exception as error:
            for _, _, future in batch:
                _settle(future, error)
        finally:
            self._next()

    async def aclose(self) -> None:
        for task in list(self._batches):
            task.cancel()
        await self._redis.aclose()


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # its caller was cancelled: the event went out all the same
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
