"""Hot copy of session state (spec 5.2): Redis with the session TTL in production, an
in-process LRU in embedded mode. The database stays the truth; a miss reads through."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agent_orchestrator.events.bus import KeyWrite
from agent_orchestrator.models.session import Session
from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)

#: A hot-copy failure is a cache miss, never a failed request: the database is the truth.
_UNAVAILABLE = (RedisError, OSError, TimeoutError)


def _key(tenant_id: str, session_id: str, namespace: str = "orchestrator") -> str:
    return f"{namespace}:session:{tenant_id}:{session_id}"


class SessionCache(Protocol):
    async def get(self, tenant_id: str, session_id: str) -> Session | None: ...
    async def put(self, session: Session, ttl_seconds: int) -> None: ...
    async def put_later(self, session: Session, ttl_seconds: int) -> KeyWrite | None:
        """`put` for a caller that publishes events next: the write for it to hand to
        the event bus (one round trip for both on Redis), or None when it is done."""
        ...

    async def drop(self, tenant_id: str, session_id: str) -> None: ...


class MemorySessionCache:
    """Sessions kept as JSON text, as in Redis: text is nothing for the garbage collector
    to walk (see events/memory.py), a model is several objects per session."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._max = max_entries

    async def get(self, tenant_id: str, session_id: str) -> Session | None:
        key = _key(tenant_id, session_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        deadline, text = entry
        if deadline <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return Session.model_validate_json(text)

    async def put(self, session: Session, ttl_seconds: int) -> None:
        key = _key(session.tenant_id, str(session.id))
        self._entries[key] = (time.monotonic() + ttl_seconds, session.model_dump_json())
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def put_later(self, session: Session, ttl_seconds: int) -> KeyWrite | None:
        await self.put(session, ttl_seconds)  # in-process: nothing to save by waiting
        return None

    async def drop(self, tenant_id: str, session_id: str) -> None:
        self._entries.pop(_key(tenant_id, session_id), None)


class RedisSessionCache:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._namespace = namespace

    async def get(self, tenant_id: str, session_id: str) -> Session | None:
        try:
            raw = await self._redis.get(_key(tenant_id, session_id, self._namespace))
        except _UNAVAILABLE as error:
            log.warning("session hot copy unavailable; reading the database", error=str(error))
            return None
        return Session.model_validate_json(raw) if raw else None

    async def put_later(self, session: Session, ttl_seconds: int) -> KeyWrite:
        key = _key(session.tenant_id, str(session.id), self._namespace)
        return KeyWrite(key, session.model_dump_json(), ttl_seconds)

    async def put(self, session: Session, ttl_seconds: int) -> None:
        key = _key(session.tenant_id, str(session.id), self._namespace)
        try:
            await self._redis.set(key, session.model_dump_json(), ex=ttl_seconds)
        except _UNAVAILABLE as error:
            log.warning("session hot copy not written", error=str(error))

    async def drop(self, tenant_id: str, session_id: str) -> None:
        try:
            await self._redis.delete(_key(tenant_id, session_id, self._namespace))
        except _UNAVAILABLE as error:
            log.warning("session hot copy not dropped", error=str(error))
