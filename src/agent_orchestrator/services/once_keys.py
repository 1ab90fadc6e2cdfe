"""Keys that can be claimed once within a time: how a repeated callback (the same
`Idempotency-Key` from a service) is recognised. A claim is held while its work runs,
then holds the work's outcome (an event id), so a repeat can be told which it repeats,
or that the first is still under way. In Redis in production, so every API instance
sees every claim; in-process in embedded mode."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from redis.asyncio import Redis


class OnceKeys(Protocol):
    async def claim(self, key: str, ttl_seconds: int) -> bool:
        """True for the first claim of `key` within `ttl_seconds`, False for a repeat."""
        ...

    async def record(self, key: str, outcome: str, ttl_seconds: int) -> None:
        """What the claimed work came to, kept for `ttl_seconds` from now."""
        ...

    async def outcome(self, key: str) -> str | None:
        """The recorded outcome of a claimed key; None while its work runs (or when the
        claim is gone)."""
        ...

    async def release(self, key: str) -> None:
        """Forget a claim whose work failed, so that a retry is not taken for a repeat."""
        ...


class MemoryOnceKeys:
    def __init__(self, capacity: int = 100_000) -> None:
        #: key -> (until, outcome; "" while the work runs)
        self._claims: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._capacity = capacity

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, "", ttl_seconds)
        return True

    async def record(self, key: str, outcome: str, ttl_seconds: int) -> None:
        if key in self._claims:
            self._put(key, outcome, ttl_seconds)

    async def outcome(self, key: str) -> str | None:
        return self._live(key) or None

    async def release(self, key: str) -> None:
        self._claims.pop(key, None)

    def _live(self, key: str) -> str | None:
        found = self._claims.get(key)
        return found[1] if found is not None and found[0] > time.monotonic() else None

    def _put(self, key: str, outcome: str, ttl_seconds: int) -> None:
        self._claims[key] = (time.monotonic() + ttl_seconds, outcome)
        self._claims.move_to_end(key)
        while len(self._claims) > self._capacity:  # the oldest claims go first
            self._claims.popitem(last=False)


class RedisOnceKeys:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:once:"

    async def claim(self, key: str, ttl_seconds: int) -> bool:
        return bool(await self._redis.set(self._prefix + key, b"", nx=True, ex=ttl_seconds))

    async def record(self, key: str, outcome: str, ttl_seconds: int) -> None:
        # XX: a claim released (or expired) meanwhile is not brought back.
        await self._redis.set(self._prefix + key, outcome.encode(), xx=True, ex=ttl_seconds)

    async def outcome(self, key: str) -> str | None:
        value = await self._redis.get(self._prefix + key)
        if not value:  # gone, or b"" while the work runs
            return None
        return value.decode() if isinstance(value, bytes) else value

    async def release(self, key: str) -> None:
        await self._redis.delete(self._prefix + key)
