"""Keys that can be claimed once within a time: how a repeated callback (the same
`Idempotency-Key` from a service) is recognised and dropped. In Redis in production, so
every API instance sees every claim; in-process in embedded mode."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from redis.asyncio import Redis


class OnceKeys(Protocol):
    async def claim(self, key: str, ttl_seconds: int) -> bool:
        """True for the first claim of `key` within `ttl_seconds`, False for a repeat."""
        ...

    async def release(self, key: str) -> None:
        """Forget a claim whose work failed, so that a retry is not taken for a repeat."""
        ...


class MemoryOnceKeys:
    def __init__(self, capacity: int = 100_000) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        now = time.monotonic()
        until = self._until.get(key)
        if until is not None and until > now:
            return False
        self._until[key] = now + ttl_seconds
        self._until.move_to_end(key)
        while len(self._until) > self._capacity:  # the oldest claims go first
            self._until.popitem(last=False)
        return True

    async def release(self, key: str) -> None:
        self._until.pop(key, None)


class RedisOnceKeys:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:once:"

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        return bool(await self._redis.set(self._prefix + key, b"1", nx=True, ex=ttl_seconds))

    async def release(self, key: str) -> None:
        await self._redis.delete(self._prefix + key)
